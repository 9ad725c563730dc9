"""The CPU chat Space: a pure serving engine (engine.py) under a thin Gradio app (app.py)."""
