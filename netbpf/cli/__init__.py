"""netbpf command line (placeholder until the CLI lands)."""


def main() -> None:
    raise SystemExit("netbpf: CLI not built yet")
