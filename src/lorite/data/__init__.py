"""Real data: BIG-bench tasks, public-domain corpora, packed token blocks."""
