"""The page of `dpl ui` and its server: layout, per-session state, the one shared model.

Each visitor's inversions live in their own `gr.State` (a `handlers.Session`), so nobody edits
another's. The model is loaded once, in a background thread started with the server, so the
first page load does not wait for it; jobs that use it run one at a time (a lock, besides
Gradio's queue, because a cancelled job's thread finishes its current UNet call after the queue
has let the next one in). Every failure becomes one line in the status field: a `DplError` as
the CLI prints it, anything else as a short note (the traceback goes to the server's log).
"""

from __future__ import annotations

import logging
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from dpl_edit.engine.model import (
    LoadedModel,
    check_gpu_options,
    load_model,
    resolve_device,
)
from dpl_edit.engine.settings import DTYPES, TARGET_TOKENS, EditSettings, InversionSettings
from dpl_edit.errors import DplError, error_line
from dpl_edit.io.atomic import atomic_write_bytes
from dpl_edit.io.images import read_image
from dpl_edit.ui.handlers import (
    METHOD_CHOICES,
    MODE_CHOICES,
    UI_STEPS,
    EditRequest,
    Inverted,
    InvertRequest,
    Scene,
    Session,
    bundled_scenes,
    cancellable,
    changed_words,
    default_words,
    discard_session,
    distinct_words,
    edit_session,
    invert_input,
)

log = logging.getLogger(__name__)

MAX_SLIDERS = 12
"""Re-weight sliders on the page, one per distinct word of the target (a prompt of the bundled
model has at most 15 tokens, of which a dozen distinct words at most)."""
SLIDERS_PER_ROW = 3


class ModelHolder:
    """The one model of the server, loaded once in the background; `lock` serialises its use."""

    def __init__(self, loader: Callable[[], LoadedModel]) -> None:
        self._loader = loader
        self._model: LoadedModel | None = None
        self._loading = threading.Lock()
        self.lock = threading.Lock()

    def start(self) -> None:
        """Begin loading in a background thread (an error shows on the first use instead)."""
        threading.Thread(target=self._load_quietly, daemon=True).start()

    def _load_quietly(self) -> None:
        """Load; a failure is reported again, as one line in the page, by each request."""
        try:
            self.get()
        except DplError as exc:  # e.g. a --model folder that is not an SD model
            print(error_line(exc), file=sys.stderr, flush=True)
        except Exception:
            log.exception("loading the model failed")

    def get(self) -> LoadedModel:
        """The model, waiting for the background load if it is still running."""
        with self._loading:
            if self._model is None:
                self._model = self._loader()
            return self._model


class CancelFlags:
    """One flag per browser session: Cancel sets the flag of the job its own session runs."""

    def __init__(self) -> None:
        self._flags: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def fresh(self, session_hash: str) -> threading.Event:
        with self._lock:
            self._flags[session_hash] = threading.Event()
            return self._flags[session_hash]

    def cancel(self, session_hash: str) -> None:
        with self._lock:
            if session_hash in self._flags:
                self._flags[session_hash].set()


def status_line(exc: BaseException) -> str:
    """What the page shows for a failure: the CLI's line for user errors, never a traceback."""
    if isinstance(exc, DplError):
        return error_line(exc)
    log.error("request failed", exc_info=exc)
    return f"error: internal error ({type(exc).__name__}); the server's log has the details"


def _captioned(pictures: list[tuple[str, Image.Image]]) -> list[tuple[Image.Image, str]]:
    """Labelled pictures in the (image, caption) order a Gallery takes."""
    return [(picture, label) for label, picture in pictures]


def _scores(result: Inverted) -> str:
    """PSNR per method, and each masked word's leakage as a table (methods as columns)."""
    lines = [
        "Reconstruction PSNR: "
        + ", ".join(f"{method.upper()} {value:.1f} dB" for method, value in result.psnr.items())
    ]
    if result.leakage:
        methods = list(result.psnr)
        lines += [
            "",
            "Attention outside the word's object (leakage, lower is better):",
            "",
            "| word | " + " | ".join(m.upper() for m in methods) + " |",
            "|---" * (len(methods) + 1) + "|",
        ]
        lines += [
            f"| {row.word} | " + " | ".join(f"{row.outside[m]:.0%}" for m in methods) + " |"
            for row in result.leakage
        ]
    return "\n".join(lines)


def build_app(
    holder: ModelHolder, scenes: list[Scene], model_args: tuple[str, ...] = ()
) -> gr.Blocks:
    """The page: input, Invert (with progress and Cancel), results, Edit, downloads.

    `model_args` are the `dpl` options that load the holder's model, for the command lines."""
    flags = CancelFlags()
    with gr.Blocks(title="dpl-edit", analytics_enabled=False) as demo:
        session = gr.State(None, delete_callback=discard_session)
        scene_index = gr.State(None)
        gr.Markdown(
            "# dpl-edit\nInvert a picture once (null-text inversion, or DPL, or both), see where "
            "each word attends, then edit it with Prompt-to-Prompt as often as you like."
        )
        with gr.Row():
            with gr.Column():
                gallery = gr.Gallery(
                    [(s.image, s.caption) for s in scenes],
                    label="Bundled scenes (exact masks: the leakage is measured)",
                    columns=3,
                    allow_preview=False,
                    height=260,
                    object_fit="contain",
                    elem_id="scenes",
                )
                upload = gr.File(label="... or upload an image", elem_id="upload")
                preview = gr.Image(label="Input", interactive=False, height=200, elem_id="preview")
            with gr.Column():
                prompt = gr.Textbox(label="Prompt (describes the image)", elem_id="prompt")
                words = gr.Textbox(label="Words that get dynamic tokens (DPL)", elem_id="words")
                method = gr.Radio(list(METHOD_CHOICES), value=InversionSettings.method.upper(),
                                  label="Method", elem_id="method")  # fmt: skip
                with gr.Row():
                    steps = gr.Number(
                        UI_STEPS, precision=0, minimum=1, label="Steps", elem_id="steps"
                    )
                    guidance = gr.Number(
                        InversionSettings.guidance, label="Guidance", elem_id="guidance"
                    )
                    seed = gr.Number(0, precision=0, label="Seed", elem_id="seed")
                with gr.Row():
                    invert_button = gr.Button("Invert", variant="primary", elem_id="invert")
                    cancel_button = gr.Button("Cancel", elem_id="cancel")
                status = gr.Markdown(elem_id="status")
        with gr.Row():
            reconstructions = gr.Gallery(label="Reconstruction", columns=2, height=240, scale=1,
                                         object_fit="contain", elem_id="reconstruction")  # fmt: skip
            attention = gr.Image(label="Each word's attention (NTI and DPL rows when both ran)",
                                 type="filepath", height=240, scale=3, elem_id="attention")  # fmt: skip
        scores = gr.Markdown(elem_id="scores")
        gr.Markdown("## Edit (from the cached inversion)")
        with gr.Row():
            with gr.Column():
                target = gr.Textbox(label="Target prompt", elem_id="target")
                mode = gr.Radio(list(MODE_CHOICES), value="swap", label="Mode", elem_id="mode")
                blend = gr.CheckboxGroup([], label="Local blend: change only where these words attend",
                                         elem_id="blend")  # fmt: skip
                cross = gr.Slider(0, 1, EditSettings.cross_replace_steps, step=0.05,
                                  label="Cross-attention injection (fraction of steps)")  # fmt: skip
                self_ = gr.Slider(0, 1, EditSettings.self_replace_steps, step=0.05,
                                  label="Self-attention injection (fraction of steps)")  # fmt: skip
                target_tokens = gr.Radio(list(TARGET_TOKENS), value=EditSettings.target_tokens,
                                         label="DPL: the target prompt's word vectors (learned, as "
                                         "in the paper, or the vocabulary's)",
                                         elem_id="target-tokens")  # fmt: skip
                edit_button = gr.Button("Edit", variant="primary", elem_id="edit")
            with gr.Column():
                gr.Markdown("Re-weight the target's words (1 = unchanged)")
                sliders = []
                for _ in range(0, MAX_SLIDERS, SLIDERS_PER_ROW):
                    with gr.Row():
                        sliders += [gr.Slider(0, 5, 1.0, step=0.1, visible=False, min_width=120)
                                    for _ in range(SLIDERS_PER_ROW)]  # fmt: skip
        edits = gr.Gallery(label="Edits: source, edit, difference", columns=6, height=280,
                           object_fit="contain", elem_id="edits")  # fmt: skip
        downloads = gr.File(label="Downloads", file_count="multiple", elem_id="downloads")
        command = gr.Textbox(label="The `dpl run` command that reproduces it", lines=2,
                             elem_id="command")  # fmt: skip

        def pick_scene(evt: gr.SelectData) -> list[Any]:
            scene = scenes[evt.index]
            return [evt.index, scene.image, scene.caption, scene.target, None, ""]

        gallery.select(pick_scene, None, [scene_index, preview, prompt, target, upload, status])

        def pick_upload(path: str | None) -> list[Any]:
            if path is None:
                return [gr.skip(), gr.skip(), ""]
            try:
                return [None, read_image(path), ""]
            except Exception as exc:
                return [None, None, status_line(exc)]

        upload.upload(pick_upload, upload, [scene_index, preview, status])

        def prefill_words(text: str) -> str:
            try:
                return " ".join(default_words(holder.get(), text))
            except Exception:  # a model that fails to load says so when Invert is pressed
                return ""

        prompt.change(prefill_words, prompt, words)

        def target_controls(text: str, source: str) -> list[Any]:
            names = distinct_words(text)[:MAX_SLIDERS]
            choices = distinct_words(f"{source} {text}")
            updates = [gr.CheckboxGroup(choices=choices, value=changed_words(source, text))]
            for i in range(MAX_SLIDERS):
                visible = i < len(names)
                updates.append(
                    gr.Slider(value=1.0, visible=visible, label=names[i] if visible else "")
                )
            return updates

        target.change(target_controls, [target, prompt], [blend, *sliders])

        def run_invert(
            file: str | None,
            index: int | None,
            text: str,
            word_text: str,
            choice: str,
            n_steps: float,
            scale: float,
            seed_value: float,
            current: Session | None,
            request: gr.Request,
            progress: gr.Progress = gr.Progress(track_tqdm=True),  # noqa: B008 (Gradio's API)
        ) -> list[Any]:
            start, fresh = time.perf_counter(), None
            try:
                if current is None:
                    fresh = Path(tempfile.mkdtemp(prefix="dpl-ui-"))
                folder = current.folder if current else fresh
                masks, source_file = None, None
                if index is not None:
                    image, masks = scenes[index].image, scenes[index].masks
                elif file:
                    image = read_image(file)
                    source_file = atomic_write_bytes(
                        folder / Path(file).name, Path(file).read_bytes()
                    )
                else:
                    raise DplError("pick a bundled scene or upload an image first")
                invert_request = InvertRequest(text, (word_text,), choice, int(n_steps or 0), scale,
                                               int(seed_value or 0))  # fmt: skip
                model = holder.get()
                with holder.lock, cancellable(model, flags.fresh(request.session_hash)):
                    result = invert_input(model, image, invert_request, folder, masks,
                                          model_args, source_file)  # fmt: skip
            except Exception as exc:
                if fresh is not None:  # a first inversion that failed leaves no folder behind
                    shutil.rmtree(fresh, ignore_errors=True)
                return [gr.skip()] * 5 + [status_line(exc)]
            seconds = time.perf_counter() - start
            files = [str(path) for path in result.session.downloads]
            return [result.session, _captioned(result.reconstructions), str(result.session.attention), _scores(result),
                    files, f"inverted in {seconds:.0f} s; now edit"]  # fmt: skip

        invert_event = invert_button.click(
            run_invert,
            [upload, scene_index, prompt, words, method, steps, guidance, seed, session],
            [session, reconstructions, attention, scores, downloads, status],
            concurrency_id="model",
            concurrency_limit=1,
        )

        def run_edit(
            request: gr.Request,
            current: Session | None,
            text: str,
            mode_name: str,
            blend_words: list[str],
            cross_steps: float,
            self_steps: float,
            vectors: str,
            *scales: float,
        ) -> list[Any]:
            start = time.perf_counter()
            try:
                if current is None:
                    raise DplError("invert an image first; edits start from its inversion")
                names = distinct_words(text)[:MAX_SLIDERS]
                reweight = {w: float(s) for w, s in zip(names, scales, strict=False) if s != 1.0}
                edit_request = EditRequest(text, mode_name, reweight, tuple(blend_words or ()),
                                           cross_steps, self_steps, vectors)  # fmt: skip
                model = holder.get()
                with holder.lock, cancellable(model, flags.fresh(request.session_hash)):
                    result = edit_session(model, current, edit_request)
            except Exception as exc:
                return [gr.skip()] * 3 + [status_line(exc)]
            seconds = time.perf_counter() - start
            return [_captioned(result.pictures), [str(p) for p in result.files], "\n".join(result.commands),
                    f"edited in {seconds:.1f} s"]  # fmt: skip

        edit_event = edit_button.click(
            run_edit,
            [session, target, mode, blend, cross, self_, target_tokens, *sliders],
            [edits, downloads, command, status],
            concurrency_id="model",
            concurrency_limit=1,
        )

        def run_cancel(request: gr.Request) -> str:
            flags.cancel(request.session_hash)
            return "cancelled"

        cancel_button.click(run_cancel, None, status, cancels=[invert_event, edit_event])
    return demo


LOOPBACK = ("127.0.0.1", "localhost", "::1")
"""Hosts that only this machine reaches: the default, served without a warning."""


def served_address(host: str, port: int) -> str:
    """The address the app listens on, as it is: for 0.0.0.0 or :: every interface (which
    Gradio would print as localhost), named by this machine's host name."""
    if host in ("0.0.0.0", "::"):
        return f"http://{socket.gethostname()}:{port}/ (every interface of this machine: {host})"
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def exposure_warning(host: str, share: bool, auth: bool, address: str) -> str | None:
    """The warning for an app that others can reach without logging in (None when only this
    machine can, or everyone must log in)."""
    if auth or (host in LOOPBACK and not share):
        return None
    return (
        f"warning: the app has no authentication and anyone who can reach {address} can use "
        "it; use --auth USER:PASS on a shared network"
    )


def serve(
    model: str | None = None,
    device: str = "auto",
    dtype: str = "float32",
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    cuda_graphs: bool = False,
    channels_last: bool = False,
    auth: tuple[str, str] | None = None,
) -> str:
    """Start the app (the model loads in the background), print its address, serve until
    interrupted; returns the address. A setting the model cannot take (`cuda_graphs` or
    `channels_last` off a GPU) is refused before anything starts. `auth` (user, password)
    makes every visitor log in (Gradio's login); without it, a `host` other than this
    machine's loopback address is served with a warning that anyone who reaches it can use
    the app."""
    check_gpu_options(resolve_device(device), cuda_graphs, channels_last)
    holder = ModelHolder(lambda: load_model(model, device, dtype, cuda_graphs, channels_last))
    holder.start()
    model_args = (*(("--model", model) if model else ()),
                  *(("--device", device) if device != "auto" else ()),
                  *(("--dtype", dtype) if dtype != DTYPES[0] else ()),
                  *(("--cuda-graphs",) if cuda_graphs else ()),
                  *(("--channels-last",) if channels_last else ()))  # fmt: skip
    demo = build_app(holder, bundled_scenes(), model_args)
    demo.queue(default_concurrency_limit=1)
    try:
        demo.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=True,
                    quiet=True, footer_links=[], auth=auth)  # fmt: skip
    except OSError as exc:  # the port is taken, or the address is not this machine's
        raise DplError(f"cannot serve on {host}:{port}: {exc}") from None
    address = demo.share_url or served_address(host, demo.server_port)
    warning = exposure_warning(host, share, auth is not None, address)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    print(f"dpl ui: {address}", flush=True)
    demo.block_thread()
    return address
