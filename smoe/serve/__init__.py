"""``smoe serve``: an OpenAI-compatible HTTP server over the continuous-batching engine (smoe.generation.Engine).

``config`` (the settings, no heavy imports: the command line builds its flags from it), ``schema`` (the request
bodies it accepts and the OpenAI error object), ``chat`` (chat templates), ``worker`` (the engine's thread and
the metrics), ``app`` (the endpoints), ``server`` (loading the model and running uvicorn). docs/serve.md.
"""
