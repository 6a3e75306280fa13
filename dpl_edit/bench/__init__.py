"""Leakage benchmark: metrics, scene lists and reports, independent of the editing engine.

Everything here takes arrays and files and returns numbers and files, so it can be tested
against hand-made masks and images without a model; the runner that produces the arrays (by
inverting and editing with each method) lives elsewhere.
"""
