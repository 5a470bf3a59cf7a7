"""What netbpf keeps: pin paths and program names, state files, the journal, locks, copies of applied policies. Written by the engine, read by everyone."""
