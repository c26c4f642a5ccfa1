"""alignment: MixDPO, DPO with a learned distribution of preference strength, on mixlogit's kernel."""
