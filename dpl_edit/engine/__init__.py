"""The editing engine: model loading, attention hooks, DDIM, text encoding, inversion, P2P edits.

Nothing here knows about the synthetic world or the benchmark; DPL's token stage (`dpl_edit.dpl`)
plugs into the null-text loop of `engine.inversion`.
"""
