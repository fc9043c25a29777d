"""The Gradio arena: anonymous battles, votes, ratings, and DPO data from the votes."""
