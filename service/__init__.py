"""The FastAPI gateway: jobs, models, datasets and /reconstruct. Never imports TensorFlow.

`service.main:app` is the ASGI app (`uvicorn service.main:app`); settings come from `DAE_*` variables.
"""
