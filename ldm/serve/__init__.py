"""`ldm-serve`: AUTOMATIC1111's HTTP API (`/sdapi/v1/...`) and a web page, over `LatentPipeline`.

`a1111` maps the API's requests and answers to the pipeline's keywords (pure functions, no server);
`worker` owns the model on one thread and batches queued requests that can share U-Net calls; `app`
is the FastAPI application (routes, auth, limits). FastAPI and uvicorn come with the `serve` extra.
"""
