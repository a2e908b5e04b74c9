"""The embedded procedural domain and its judges: scenes (spec, prompt, render), the prompt parser, the attribute checker and domain CLIP, the detail judge."""
