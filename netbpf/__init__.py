"""netbpf: declarative XDP/TC data-plane controller (firewall and L4 load balancing)."""

__version__ = "0.1.0"
