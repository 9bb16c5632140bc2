"""``sp-ray serve``: the exported ONNX model behind HTTP, as a Ray Serve application with dynamic batching.

    settings.py   ServeSettings: the command's options (also a ``serve deploy`` config's ``args``), checked
                  before Ray starts, and the model's batch limit
    request.py    an HTTP request -> one decoded image and its score threshold, or a 4xx ``BadRequest``
    response.py   ``export.runtime.Instances`` -> the JSON a client gets (COCO bbox and RLE)
    app.py        the Serve deployment (one ``Segmenter`` per replica, ``@serve.batch``) and its routes
    run.py        start on the current Ray (local, or the cluster of RAY_ADDRESS) and block until Ctrl-C

The replica imports ``export.runtime`` (numpy + onnxruntime), PIL and Starlette (which Ray Serve ships),
never torch; ``export.client`` turns the JSON back into boolean masks with numpy alone.
"""
