"""The OpenAI-compatible server (`llava-next serve`): protocol models, media policy, serving logic, the app.

Importing this package imports nothing heavy; fastapi and uvicorn are imported when the app is built.
"""
