"""Imaging speed benchmark: reader vs SimpleITK, the volume cache, encoder training throughput.

Run from the repository root (takes a few minutes on 2 CPU cores)::

    .venv/bin/python benchmarks/imaging.py            # full
    .venv/bin/python benchmarks/imaging.py --quick    # smaller CT, fewer series and steps

Everything is measured in this one run and printed as a table:

(a) load + resample of a synthetic 512 x 512 x 80 CT series (int16, written
    with pydicom; pydicom-data has no full-size CT series) onto the same
    2 mm grid: ``read_image`` + ``preprocess`` against SimpleITK
    ``ImageSeriesReader`` (GDCM, incl. ``GetGDCMSeriesFileNames``) +
    ``ResampleImageFilter`` (linear).  The two pipelines run alternately
    (same machine load, page cache hot for both); medians of the times and
    of the paired ratios.  Target: ours <= 1.2 x SimpleITK.
(b) second-epoch data time over ~50 small series (64 x 64 x 24) without a
    cache (read + preprocess every time) and with :class:`VolumeCache`
    (the first epoch fills it).  Target: >= 20 x faster.
(c) training-step throughput (volumes/s: forward, backward, Adam step) of
    every registered image encoder with its default widths at its
    ``example_input_size``, on CPU, and on CUDA when available.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402

from data_adapters.imaging import ImagingParams, VolumeCache, preprocess, read_image  # noqa: E402


def write_ct_series(folder: Path, *, rows: int, cols: int, slices: int, pixel_mm: float, dz: float,
                    seed: int = 0) -> Path:
    """A CT series of an elliptic body phantom with noise (int16, slope 1, intercept -1024)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study, series, for_uid = generate_uid(), generate_uid(), generate_uid()
    yy, xx = np.mgrid[0:rows, 0:cols]
    body = ((yy - rows / 2) / (0.38 * rows)) ** 2 + ((xx - cols / 2) / (0.45 * cols)) ** 2 <= 1
    origin = (-cols * pixel_mm / 2, -rows * pixel_mm / 2, 0.0)
    for k in range(slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.PatientName = "BENCH^MARK"
        ds.PatientID = "BENCH"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, for_uid
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{origin[0]:.4f}", f"{origin[1]:.4f}", f"{origin[2] + k * dz:.4f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.PixelSpacing = [f"{pixel_mm}", f"{pixel_mm}"]
        ds.SliceThickness = f"{dz}"
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
        hu = np.where(body, 40.0, -1000.0) + rng.normal(0, 15, size=(rows, cols))
        ds.PixelData = np.clip(hu + 1024, -32768, 32767).astype("<i2").tobytes()
        ds.save_as(folder / f"IM{k:04d}.dcm", enforce_file_format=True)
    return folder


def _paired_times(fn_a: Callable[[], object], fn_b: Callable[[], object], repeats: int
                  ) -> tuple[float, float, float, object, object]:
    """Median times of two pipelines run alternately (a, b, a, b ...), and the median of the per-pair ratios.

    Alternating keeps both under the same machine load (CPU contention, page
    cache); each is warmed up once first.
    """
    fn_a()
    fn_b()
    ta, tb, out_a, out_b = [], [], None, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out_a = fn_a()
        t1 = time.perf_counter()
        out_b = fn_b()
        t2 = time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
    ratio = statistics.median(a / b for a, b in zip(ta, tb))
    return statistics.median(ta), statistics.median(tb), ratio, out_a, out_b


# --------------------------------------------------------------------------- #
# (a) reader + resample vs SimpleITK
# --------------------------------------------------------------------------- #
def bench_reader(tmp: Path, *, rows: int, slices: int, repeats: int) -> list[tuple[str, str, str]]:
    folder = write_ct_series(tmp / "ct_big", rows=rows, cols=rows, slices=slices, pixel_mm=500.0 / rows, dz=2.5)
    extent = np.array([500.0, 500.0, slices * 2.5])
    params = ImagingParams("ct", spacing=(2.0, 2.0, 2.0), size=tuple(int(v) for v in np.ceil(extent / 2.0)),
                           ct_window=(-1000.0, 1000.0))

    def ours_read():
        return read_image(folder, modality="ct")

    def ours_total():
        return preprocess(read_image(folder, modality="ct"), None, params)[0]

    vol = ours_read()
    centre = vol.index_to_physical((np.asarray(vol.array.shape[::-1], float) - 1) / 2)[0]
    out_origin = centre - np.asarray(params.spacing) * (np.asarray(params.size) - 1) / 2

    def sitk_read():
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
        return reader.Execute()

    def sitk_total():
        f = sitk.ResampleImageFilter()
        f.SetSize(list(params.size))
        f.SetOutputSpacing(params.spacing)
        f.SetOutputOrigin(out_origin.tolist())
        f.SetOutputDirection(vol.direction)
        f.SetTransform(sitk.Transform())
        f.SetInterpolator(sitk.sitkLinear)
        f.SetDefaultPixelValue(-1000.0)
        f.SetOutputPixelType(sitk.sitkFloat32)
        return sitk.GetArrayFromImage(f.Execute(sitk_read()))

    t_ours_read, t_sitk_read, r_read, _, _ = _paired_times(ours_read, sitk_read, repeats)
    t_ours, t_sitk, r_total, ours_img, sitk_img = _paired_times(ours_total, sitk_total, repeats)
    same = float(np.max(np.abs(ours_img[0] - (np.clip(sitk_img, -1000, 1000) + 1000) / 2000)))
    shape = f"{rows}x{rows}x{slices}"
    return [
        (f"(a) read {shape} CT series: ours (pydicom)", f"{t_ours_read:.3f} s", ""),
        (f"(a) read {shape} CT series: SimpleITK/GDCM", f"{t_sitk_read:.3f} s",
         f"ours/SimpleITK {r_read:.2f}x (median of {repeats} paired runs)"),
        (f"(a) read + resample to 2 mm {tuple(params.size)}: ours", f"{t_ours:.3f} s", "read_image + preprocess"),
        (f"(a) read + resample to 2 mm {tuple(params.size)}: SimpleITK", f"{t_sitk:.3f} s",
         f"ours/SimpleITK {r_total:.2f}x (target <= 1.2x); same output: max |diff| {same:.1e}"),
    ]


# --------------------------------------------------------------------------- #
# (b) cache
# --------------------------------------------------------------------------- #
def bench_cache(tmp: Path, *, n_series: int) -> list[tuple[str, str, str]]:
    folders = [write_ct_series(tmp / f"small{i:03d}", rows=64, cols=64, slices=24, pixel_mm=1.5, dz=2.0, seed=i)
               for i in range(n_series)]
    params = ImagingParams("ct", spacing=(2.0, 2.0, 2.0), size=(24, 24, 24))

    def epoch_uncached() -> float:
        t0 = time.perf_counter()
        for f in folders:
            preprocess(read_image(f, modality="ct"), None, params)
        return time.perf_counter() - t0

    cache = VolumeCache(tmp / "cache")

    def epoch_cached() -> tuple[float, int]:
        t0 = time.perf_counter()
        hits = sum(cache.load_preprocessed(f, None, params).cache_hit for f in folders)
        return time.perf_counter() - t0, hits

    epoch_uncached()  # warm-up (page cache, imports)
    t_plain = statistics.median(epoch_uncached() for _ in range(2))
    t_first, hits1 = epoch_cached()
    later = [epoch_cached() for _ in range(3)]
    t_second = statistics.median(t for t, _ in later)
    hits2 = later[0][1]
    return [
        (f"(b) epoch over {n_series} series 64x64x24, no cache", f"{t_plain:.3f} s", "read + preprocess, median of 2"),
        ("(b) epoch 1 with VolumeCache (fills it)", f"{t_first:.3f} s", f"{hits1} hits"),
        ("(b) epoch 2+ with VolumeCache", f"{t_second:.3f} s",
         f"{hits2} hits, median of 3; {t_plain / t_second:.0f}x faster than no cache (target >= 20x)"),
    ]


# --------------------------------------------------------------------------- #
# (c) encoders
# --------------------------------------------------------------------------- #
def bench_encoders(device: str, *, batch: int, steps: int, small: bool) -> list[tuple[str, str, str]]:
    from encoders.registry import create_encoder, get_encoder_entry, list_encoders

    rows = []
    for name in list_encoders("image3d"):
        cls = get_encoder_entry(name).cls
        size = tuple(getattr(cls, "example_input_size", (16, 16, 16)))
        kwargs = dict(getattr(cls, "example_kwargs", {})) if small else {}
        torch.manual_seed(0)
        enc = create_encoder(name, 3, 1, 16, **kwargs).to(device).train()
        opt = torch.optim.Adam(enc.parameters(), lr=1e-4)
        x = torch.randn(batch, 1, *size, device=device)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            enc(x).pow(2).mean().backward()
            opt.step()

        step()  # warm-up (kernel selection, allocator)
        times = []
        for _ in range(steps):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        dt = statistics.median(times)
        n_params = sum(p.numel() for p in enc.parameters()) / 1e6
        rows.append((f"(c) {name} train step {device}, batch {batch}, {'x'.join(map(str, size))}",
                     f"{batch / dt:.1f} vol/s", f"median {dt * 1000:.0f} ms/step of {steps}, {n_params:.2f} M params"
                     + (", example widths" if small else ", default widths")))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="256x256x40 CT, 20 series, 2 steps")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per encoder (default 5)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--small-encoders", action="store_true", help="encoders at their example_kwargs widths")
    p.add_argument("--skip", default="", help="comma-separated sections to skip: a,b,c")
    args = p.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"CPU threads: torch {torch.get_num_threads()}, SimpleITK {sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()}; "
          f"torch {torch.__version__}, pydicom {pydicom.__version__}, SimpleITK {sitk.Version.VersionString()}; "
          f"CUDA: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not available'}; "
          f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    rows: list[tuple[str, str, str]] = []
    tmp = Path(tempfile.mkdtemp(prefix="radfusion_bench_"))
    try:
        if "a" not in skip:
            rows += bench_reader(tmp, rows=256 if args.quick else 512, slices=40 if args.quick else 80,
                                 repeats=args.repeats)
        if "b" not in skip:
            rows += bench_cache(tmp, n_series=20 if args.quick else 50)
        if "c" not in skip:
            steps = args.steps or (2 if args.quick else 5)
            rows += bench_encoders("cpu", batch=2, steps=steps, small=args.small_encoders)
            if torch.cuda.is_available():
                torch.backends.cudnn.benchmark = True
                rows += bench_encoders("cuda", batch=4, steps=10, small=args.small_encoders)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    print(f"\n{'measurement':<{w0}}  {'time / rate':>{w1}}  notes")
    print("-" * (w0 + w1 + 40))
    for a, b, c in rows:
        print(f"{a:<{w0}}  {b:>{w1}}  {c}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
