"""Dynamic Prompt Learning: its losses, word maps, background estimation and the token stage."""
