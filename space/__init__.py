"""The CPU chat Space: a thin Gradio app (app.py) over pure modules that tests drive without a browser: the model
catalog (catalog.py), sampling and replies (replies.py), history → messages (history.py), the serving engine
(engine.py) and the vote log (votes.py). The package deploy/ (outside it, never uploaded) puts it on a Hugging Face
Space (scripts/deploy_space.py)."""
