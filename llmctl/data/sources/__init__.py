"""Where documents come from: local files (text.py), URLs (url.py), JSON(L) / parquet rows
(structured.py) and Hugging Face Hub datasets (hub.py), each producing a base.SourcePlan."""
