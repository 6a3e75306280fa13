"""The files of one invert-and-edit run, shared by `dpl run` and every job of `dpl batch`.

Both write the same things: the inversion folder (so further edits need no new inversion), the
reconstruction, the attention grid of the prompt's words and each edit, every file atomically.
Only where they go differs: next to `dpl run`'s output file, or into a batch job's folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dpl_edit.engine.artifact import Inversion
from dpl_edit.engine.edit import EditResult
from dpl_edit.io.images import save_png
from dpl_edit.io.pictures import attention_grid
from dpl_edit.io.targets import check_folder_target, check_image_target
from dpl_edit.metrics import psnr

POOR_RECONSTRUCTION_DB = 20.0
"""Below this PSNR against the input, a reconstruction has lost the picture: on the bundled
models a scene of their world reconstructs at about 30 dB with NTI, a photo at about 10."""


def reconstruction_psnr(inversion: Inversion, reconstruction: Image.Image) -> float:
    """The reconstruction's PSNR (dB) against the image the inversion inverted."""
    return psnr(np.asarray(inversion.image), np.asarray(reconstruction))


def poor_reconstruction(value: float, method: str) -> str | None:
    """A warning when a reconstruction of `value` dB is too poor for its edits to be worth
    anything (None when it is not): edits keep what the reconstruction keeps."""
    if value >= POOR_RECONSTRUCTION_DB:
        return None
    why = (
        "DDIM inversion drifts at guidance above 1 (try --method nti), or the model cannot "
        "represent this image"
        if method == "ddim"
        else "the model cannot represent this image"
    )
    return (
        f"the reconstruction is poor ({value:.1f} dB PSNR against the input, under "
        f"{POOR_RECONSTRUCTION_DB:.0f} dB): {why}, and its edits will be as poor; the bundled "
        "models know only 64x64 coloured shapes: for photos give a Stable Diffusion folder "
        "with --model FOLDER"
    )


@dataclass(frozen=True)
class RunFiles:
    """Where one run's files go; `edits` names each edit's image, in the order of the edits."""

    inversion: Path
    source: Path
    attention: Path
    edits: dict[str, Path]

    @classmethod
    def next_to(cls, out: Path) -> RunFiles:
        """`dpl run`'s layout: OUT (PNG or JPEG), OUT_source.png, OUT_attention.png, the
        OUT_inversion folder."""
        return cls(
            inversion=out.with_name(f"{out.stem}_inversion"),
            source=out.with_name(f"{out.stem}_source.png"),
            attention=out.with_name(f"{out.stem}_attention.png"),
            edits={"image": out},
        )

    @classmethod
    def in_folder(cls, folder: Path, n_edits: int) -> RunFiles:
        """A batch job's layout: inversion/, source.png, attention.png, edit-1.png, ..."""
        return cls(
            inversion=folder / "inversion",
            source=folder / "source.png",
            attention=folder / "attention.png",
            edits={f"edit-{k}": folder / f"edit-{k}.png" for k in range(1, n_edits + 1)},
        )

    def check(self, overwrite: bool, inputs: Sequence[Path] = ()) -> None:
        """Refuse, before any work, a file or folder these outputs must not replace (one the
        tool did not make, or any without `overwrite`) or an input (`dpl_edit.io.targets`)."""
        for path in [*self.edits.values(), self.source, self.attention]:
            check_image_target(path, overwrite, inputs)
        check_folder_target(self.inversion, overwrite, inputs)

    def save(self, inversion: Inversion, results: Sequence[EditResult]) -> dict[str, Path]:
        """Write everything (replacing the tool's earlier files); return {name: path}, edits
        by name.

        The source branch of every edit is the same reconstruction, so the first one is saved.
        """
        if len(results) != len(self.edits) or not results:
            raise ValueError(f"{len(self.edits)} edit files for {len(results)} edits")
        pairs = zip(self.edits.items(), results, strict=True)
        written = {name: result.save(path) for (name, path), result in pairs}
        return {
            **written,
            "source": save_png(results[0].source, self.source),
            "inversion": inversion.save(self.inversion, overwrite=True),
            "attention": attention_grid(
                inversion.image,
                inversion.words,
                [(inversion.method.upper(), inversion.attention)],
                self.attention,
            ),
        }
