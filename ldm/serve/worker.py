"""One thread owns the model; requests queue for it, and those that can share U-Net calls share them.

Every image is drawn from its own seed (the pipeline's per-image generators), so an image does not
depend on the batch it was drawn in: a request's images equal a lone run's, whoever else was queued.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

from ldm.serve.a1111 import ApiError, Job


class Interrupted(Exception):
    """Raised from the step callback when /interrupt was called: the job stops at this step."""

    def __init__(self, latents):
        super().__init__("interrupted")
        self.latents = latents


@dataclass
class Progress:
    """What /progress reports: the running call's step, and the jobs waiting."""

    job_count: int = 0
    step: int = 0
    steps: int = 0
    started: float = 0.0
    running: bool = False
    interrupted: bool = False
    job_timestamp: str = ""


@dataclass
class Result:
    images: list
    parameters: list[str]
    model_title: str
    model_hash: str | None


class Worker:
    """The model's owner. `submit(job)` returns a Future of a `Result` (or of an `ApiError`).

    Queued jobs whose `key` matches the first one in the queue (same kind, model, size, sampler,
    steps, ...) are drawn in one pipeline call of up to `max_batch` images.
    """

    def __init__(self, load, model_title: str, max_queue: int = 64, max_batch: int = 16):
        self.load = load  # title -> (LatentPipeline, model hash)
        self.title = model_title
        self.pipe, self.hash = load(model_title)
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.max_batch = max_batch
        self.progress = Progress()
        self.interrupt_flag = threading.Event()
        self.stopping = threading.Event()
        self.lock = threading.Lock()  # model switches against calls
        self.thread = threading.Thread(target=self.run, name="ldm-serve-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Future:
        if self.stopping.is_set():
            raise ApiError(503, "the server is shutting down")
        future: Future = Future()
        try:
            self.queue.put_nowait((job, future))
        except queue.Full:
            raise ApiError(503, f"the queue is full ({self.queue.maxsize} requests waiting); try again later") from None
        self.progress.job_count = self.queue.qsize()
        return future

    def switch(self, title: str) -> None:
        """Make `title` the current model (loaded on the caller's thread, swapped between calls)."""
        if title == self.title:
            return
        pipe, digest = self.load(title)
        with self.lock:
            self.pipe, self.hash, self.title = pipe, digest, title

    def run(self) -> None:
        pending: list = []
        while True:
            if self.stopping.is_set() and pending:  # queued behind the running call: refused, not drawn
                for _, future in pending:
                    future.set_exception(ApiError(503, "the server is shutting down"))
                pending = []
            if not pending:
                item = self.queue.get()
                if item is None:
                    return
                pending.append(item)
            first, _ = pending[0]
            batch, rest, size = [], [], 0
            while True:  # everything waiting now that can share the first job's calls
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self.queue.put(None)
                    break
                pending.append(item)
            for job, future in pending:
                if job.key == first.key and size + len(job.prompts) <= max(self.max_batch, len(first.prompts)):
                    batch.append((job, future))
                    size += len(job.prompts)
                else:
                    rest.append((job, future))
            pending = rest
            self.progress.job_count = self.queue.qsize() + len(pending)
            self.draw(batch)

    def draw(self, batch: list) -> None:
        jobs = [job for job, _ in batch]
        for _, future in batch:
            future.set_running_or_notify_cancel()
        try:
            with self.lock:
                if jobs[0].model not in (None, self.title):
                    self.pipe, self.hash = self.load(jobs[0].model)
                    self.title = jobs[0].model
                results = self.call(jobs)
        except ApiError as e:
            for _, future in batch:
                future.set_exception(e)
            return
        except ValueError as e:  # the pipeline refused a setting: the request's fault
            for _, future in batch:
                future.set_exception(ApiError(422, " ".join(str(e).split())))
            return
        except Exception as e:  # noqa: BLE001 — the server never dies of a request
            for _, future in batch:
                future.set_exception(ApiError(500, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"))
            return
        for (_, future), result in zip(batch, results):
            future.set_result(result)

    def call(self, jobs: list[Job]) -> list[Result]:
        """One pipeline call for all `jobs` (equal keys), split back per job."""
        pipe, shared = self.pipe, dict(jobs[0].shared)
        prompts = [p for job in jobs for p in job.prompts]
        kw = dict(negative_prompt=[n for job in jobs for n in job.negatives],
                  seed=[s for job in jobs for s in job.seeds])
        if jobs[0].kind == "img2img":
            kw["image"] = [i for job in jobs for i in job.images]
            if jobs[0].masks:
                kw["mask_image"] = [m for job in jobs for m in job.masks]
        elif "strength" in shared:
            shared.pop("strength")
        self.interrupt_flag.clear()
        progress = self.progress
        progress.running, progress.step, progress.started = True, 0, time.time()
        progress.job_timestamp = time.strftime("%Y%m%d%H%M%S")
        progress.steps = shared["num_inference_steps"]
        progress.interrupted = False

        def step(pipeline, i, t, tensors):
            progress.step = i + 1
            if self.interrupt_flag.is_set():
                raise Interrupted(tensors["latents"])
            return tensors

        try:
            out = pipe(prompts, progress=False, callback_on_step_end=step, **shared, **kw)
            images, parameters = out.images, out.parameters
        except Interrupted as stop:  # A1111 answers with what the sampler had reached
            progress.interrupted = True
            images = pipe.to_images(pipe.decode_latents(stop.latents), "pil")
            parameters = [""] * len(prompts)
        finally:
            progress.running = False
        results, start = [], 0
        for job in jobs:
            n = len(job.prompts)
            results.append(Result(images[start:start + n], parameters[start:start + n], self.title, self.hash))
            start += n
        return results

    def interrupt(self) -> None:
        if self.progress.running:
            self.interrupt_flag.set()

    def stop(self) -> None:
        """Finish the running call; answer every queued request with a 503."""
        self.stopping.set()
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[1].set_exception(ApiError(503, "the server is shutting down"))
        self.queue.put(None)
        self.thread.join(timeout=600)
