"""Videos: frame count, size and frame rate kept; each frame routed on its own; reports."""

from __future__ import annotations

import csv
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from inference_helpers import tiny_model
from skimage import data
from torch import nn

import loraxir
from loraxir import degradations
from loraxir.errors import DataError
from loraxir.inference.restorer import Restorer, Routing
from loraxir.inference.video import (
    FrameReport,
    VideoWriter,
    probe_video,
    read_frames,
    restore_video,
)
from loraxir.router import DegradationRouter


def _frames(count: int, height: int, width: int) -> np.ndarray:
    photo = data.astronaut()
    return np.stack([photo[i * 4 : i * 4 + height, i * 3 : i * 3 + width] for i in range(count)])


def _write_lossless(path, frames: np.ndarray, fps: int) -> None:
    """FFV1 in Matroska: frames come back bit-exact, so routing sees the degradation."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "bgr0"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


@pytest.mark.parametrize(
    ("suffix", "size"), [(".mp4", (36, 52)), (".mp4", (35, 51)), (".webm", (35, 51))]
)
def test_restored_video_keeps_frame_count_size_and_rate(tmp_path, suffix, size):
    source = tmp_path / f"in{suffix}"
    with VideoWriter(source, size[1], size[0], Fraction(12)) as writer:
        for frame in _frames(7, *size):
            writer.write(frame)
    target = tmp_path / f"out{suffix}"
    report = restore_video(Restorer(tiny_model(), tile=None), source, target, smooth=0.5)
    info = probe_video(target)
    assert (info.frames, info.height, info.width, info.fps) == (7, *size, Fraction(12))
    assert len(report.rows) == 7 == len(list(read_frames(target)))


def test_smoothing_keeps_momentum_of_the_previous_gates_and_each_frames_probabilities():
    classes = ["noise", "rain"]
    previous = Routing(classes, torch.tensor([1.0, 0.0]), torch.tensor([0.9, 0.1]))
    current = Routing(classes, torch.tensor([0.0, 1.0]), torch.tensor([0.2, 0.8]))
    smoothed = current.smoothed(previous, 0.9)
    torch.testing.assert_close(smoothed.gates, torch.tensor([0.9, 0.1]))
    assert torch.equal(smoothed.probabilities, current.probabilities) and smoothed.label == "rain"
    assert current.smoothed(previous, 0.0) is current and current.smoothed(None, 0.9) is current


class _Statistics(nn.Module):
    """Hand-made degradation features: log high-frequency and gradient energy, and JPEG
    blockiness (column differences at 8-pixel block edges over the others)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        gray = images.mean(1, keepdim=True)
        kernel = torch.tensor([[[[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]]])
        laplacian = F.conv2d(gray, kernel).abs().mean((1, 2, 3))
        dx = (gray[..., 1:] - gray[..., :-1]).abs()
        dy = (gray[..., 1:, :] - gray[..., :-1, :]).abs().mean((1, 2, 3))
        columns = dx.mean((1, 2))
        edge = (torch.arange(columns.shape[-1]) % 8) == 7
        block = columns[:, edge].mean(-1) / (columns[:, ~edge].mean(-1) + 1e-4)
        energies = torch.stack([laplacian, dx.mean((1, 2, 3)), dy], 1)
        return torch.cat([energies.add(1e-4).log(), block[:, None]], 1)


@pytest.fixture(scope="module")
def video_router() -> DegradationRouter:
    """A router trained here (about 10 s) to tell the time_varying suite's classes apart."""
    suite = degradations.suite("time_varying")
    torch.manual_seed(0)
    router = DegradationRouter.from_encoder(
        _Statistics(), suite.task_names, image_size=32, grid=2, hidden_dim=16, embed_dim=8
    )
    photos = [
        torch.from_numpy(p).permute(2, 0, 1).float() / 255 for p in (data.chelsea(), data.coffee())
    ]
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.Adam([p for p in router.parameters() if p.requires_grad], 1e-2)
    router.train()
    for _ in range(150):
        labels = torch.arange(12) % 3
        images = []
        for index, label in enumerate(labels.tolist()):
            photo = photos[index % 2]
            top, left = (
                int(torch.randint(0, s - 64, (1,), generator=generator)) for s in photo.shape[1:]
            )
            crop = photo[None, :, top : top + 64, left : left + 64]
            images.append(suite.degrade(crop, label, generator)[0][0])
        loss = F.cross_entropy(router.logits(torch.stack(images)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return router.eval()


def test_time_varying_degradations_are_detected_per_frame(tmp_path, video_router):
    suite = degradations.suite("time_varying")
    clean = torch.from_numpy(_frames(12, 96, 96)).permute(0, 3, 1, 2).float() / 255
    degraded, labels, _ = suite.degrade_video(clean, torch.Generator().manual_seed(3), period=4)
    to_uint8 = lambda x: (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()  # noqa: E731
    _write_lossless(tmp_path / "lq.mkv", to_uint8(degraded), fps=10)
    _write_lossless(tmp_path / "gt.mkv", to_uint8(clean), fps=10)
    config = loraxir.LoraIRConfig(degradations=list(suite.task_names), r=2)
    model = loraxir.get_loraxir_model(
        loraxir.create_backbone("nafnet-tiny"), config, router=video_router
    )
    report = restore_video(
        Restorer(model.eval(), tile=None),
        tmp_path / "lq.mkv",
        tmp_path / "out.mkv",
        reference=tmp_path / "gt.mkv",
    )
    detected = [row["detected"] for row in report.rows]
    expected = [suite.task_names[i] for i in labels.tolist()]
    # Chance is 4 of 12; the tiny hand-feature router gets 10 or more, 3 of 4 per segment.
    assert sum(d == e for d, e in zip(detected, expected, strict=True)) >= 10, (detected, expected)
    for start in range(0, 12, 4):
        assert detected[start : start + 4].count(expected[start]) >= 3, (detected, expected)
    report.write_csv(tmp_path / "frames.csv")
    report.plot(tmp_path / "frames.png")
    with open(tmp_path / "frames.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12 and {"detected", "gate_noise", "psnr", "psnr_input"} <= set(rows[0])
    lq, gt = (
        torch.from_numpy(to_uint8(v)).permute(0, 3, 1, 2).double() / 255 for v in (degraded, clean)
    )
    restored = torch.from_numpy(np.stack(list(read_frames(tmp_path / "out.mkv"))))
    restored = restored.permute(0, 3, 1, 2).double() / 255
    for row, a, b, c in zip(report.rows, lq, gt, restored, strict=True):
        assert row["psnr_input"] == pytest.approx(
            loraxir.metrics.psnr(a[None], b[None]).item(), abs=1e-3
        )
        # the output is H.264 (crf 18): its frames read back within a fraction of a dB
        assert row["psnr"] == pytest.approx(loraxir.metrics.psnr(c[None], b[None]).item(), abs=0.3)
        gates = {name: row[f"gate_{name}"] for name in suite.task_names}
        assert max(gates, key=gates.get) == row["detected"]  # top-1 gates: the detected class
    flagged = [row["confidence"] < video_router.unsure_below for row in report.rows]
    assert [row["unsure"] == "True" for row in rows] == flagged
    assert (tmp_path / "frames.png").stat().st_size > 1000


@pytest.mark.parametrize(("suffix", "count"), [(".mp4", 60), (".mkv", 50), (".webm", 40)])
def test_videos_longer_than_the_encoders_lookahead_are_written(tmp_path, suffix, count):
    """Frames were stamped in the stream's time base, which the muxer changes once the
    encoder's lookahead fills: MP4 and MKV failed from frame 43, WebM from frame 26."""
    with VideoWriter(tmp_path / f"v{suffix}", 16, 16, Fraction(30000, 1001)) as writer:
        for frame in _frames(count, 16, 16):
            writer.write(frame)
    info = probe_video(tmp_path / f"v{suffix}")
    assert (info.frames, info.fps) == (count, Fraction(30000, 1001))


def test_display_rotation_is_kept(tmp_path):
    """A phone's portrait clip is stored sideways with a rotation to display it upright."""
    with VideoWriter(tmp_path / "phone.mp4", 24, 16, Fraction(10), rotation=90) as writer:
        for frame in _frames(3, 16, 24):
            writer.write(frame)
    assert probe_video(tmp_path / "phone.mp4").rotation == 90
    restore_video(Restorer(tiny_model(), tile=None), tmp_path / "phone.mp4", tmp_path / "o.mp4")
    info = probe_video(tmp_path / "o.mp4")
    assert (info.rotation, info.width, info.height, info.frames) == (90, 24, 16, 3)


def test_a_video_job_that_fails_places_nothing_and_its_rerun_restores_it(tmp_path, monkeypatch):
    """The video was renamed into place before its reports were written: a failure then
    left it, and the rerun skipped the job as done."""
    from loraxir.inference import batch, video

    _write_lossless(tmp_path / "clip.mkv", _frames(3, 16, 16), fps=10)
    restorer = Restorer(tiny_model(), tile=None)

    def full_disk(self, path, title=""):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(video.FrameReport, "plot", full_disk)
    jobs, outcome = batch.collect([str(tmp_path / "clip.mkv")], tmp_path / "out")
    batch.run(restorer, batch.pending(jobs, outcome, overwrite=False), outcome, progress=False)
    assert outcome.failed == [
        (str(tmp_path / "clip.mkv"), f"Cannot write {tmp_path / 'out' / 'clip.mkv'}: [Errno 28] "
         "No space left on device")
    ]  # fmt: skip
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    monkeypatch.undo()
    jobs, outcome = batch.collect([str(tmp_path / "clip.mkv")], tmp_path / "out")
    batch.run(restorer, batch.pending(jobs, outcome, overwrite=False), outcome, progress=False)
    assert not outcome.failed
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "clip.frames.csv", "clip.frames.png", "clip.mkv"
    ]  # fmt: skip


def test_a_video_without_frames_or_with_a_wrong_reference_is_refused_before_restoring(tmp_path):
    with av.open(str(tmp_path / "empty.mkv"), "w") as container:  # a header, no frame
        stream = container.add_stream("ffv1", rate=10)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "bgr0"
        container.start_encoding()
    restorer = Restorer(tiny_model(), tile=None)
    with pytest.raises(loraxir.DataError, match=r"empty\.mkv"):
        restore_video(restorer, tmp_path / "empty.mkv", tmp_path / "o.mkv")
    assert not (tmp_path / "o.mkv").exists()
    for name, count in (("in.mkv", 4), ("ref.mkv", 3)):
        _write_lossless(tmp_path / name, _frames(count, 16, 16), fps=10)
    restored = []
    with pytest.raises(loraxir.DataError, match=r"3 frames of 16x16.*4 of 16x16"):
        restore_video(restorer, tmp_path / "in.mkv", tmp_path / "o.mkv",
                      reference=tmp_path / "ref.mkv", on_frame=restored.append)  # fmt: skip
    assert restored == []
    before = (tmp_path / "in.mkv").read_bytes()
    for target, message in [
        (tmp_path / "in.mkv", "is the input video"),
        (tmp_path / "o.png", "a video suffix"),
        (tmp_path / "in.mkv" / "o.mkv", r"in\.mkv. is a file"),
    ]:
        with pytest.raises(loraxir.DataError, match=message):
            restore_video(restorer, tmp_path / "in.mkv", target)
    restore_video(restorer, tmp_path / "in.mkv", tmp_path / "s.mkv", smooth=np.float32(0.5))
    (tmp_path / "s.mkv").unlink()
    with pytest.raises(loraxir.DataError, match=r"--smooth must be in \[0, 1\), got None"):
        restore_video(restorer, tmp_path / "in.mkv", tmp_path / "o.mkv", smooth=None)
    assert (tmp_path / "in.mkv").read_bytes() == before and not (tmp_path / "o.mkv").exists()


def test_a_frame_of_another_size_is_refused_not_rescaled(tmp_path):
    with pytest.raises(DataError, match=r"Frame 1 .* is 64x48, the video's first frames 48x32"):
        with VideoWriter(tmp_path / "v.mkv", 48, 32, Fraction(12)) as writer:
            writer.write(np.zeros((32, 48, 3), np.uint8))
            writer.write(np.zeros((48, 64, 3), np.uint8))
    with pytest.raises(DataError, match=r"uint8 arrays, got float32"):
        with VideoWriter(tmp_path / "f.mkv", 48, 32, Fraction(12)) as writer:
            writer.write(np.zeros((32, 48, 3), np.float32))
    with pytest.raises(DataError, match="frame rate > 0"):
        VideoWriter(tmp_path / "z.mkv", 48, 32, Fraction(0))


def test_the_report_plot_shows_a_file_name_with_dollar_signs_as_it_is(tmp_path):
    """Matplotlib would read ``$10_$`` as TeX and fail on it."""
    report = FrameReport(["noise", "rain"])
    report.add(Routing(["noise", "rain"], torch.tensor([1.0, 0.0])), None, None)
    assert report.plot(tmp_path / "gates.png", title="US$10_$20.avi").is_file()
