"""bpf: eBPF capture programs and their bcc loader. Not built yet (issue 3); placeholder."""
