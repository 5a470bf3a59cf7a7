"""The apply engine: program spec, plan and execute, journal and recovery, state files, persistence."""
