"""dogo convert: an image-folder tree to .beton, with every kind of awkward file."""
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

ffcv = pytest.importorskip("ffcv", reason="the ffcv extra is not installed")

from dogo.core.errors import DataError  # noqa: E402
from dogo.pipelines.convert import ConvertOptions, convert, sidecar  # noqa: E402


def _jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def _noise(w, h, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


@pytest.fixture()
def awkward_tree(tmp_path):
    """Two classes; 'a' holds plain and awkward-but-decodable files, 'b' holds the undecodable ones beside good ones.
    Returns the root and, per file name, the (height, width) it must be stored at (None: must be skipped)."""
    root = tmp_path / "src"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    expect = {}
    _noise(40, 30, 0).save(root / "a" / "plain.jpg", quality=95); expect["plain.jpg"] = (30, 40)
    _noise(24, 24, 1, "CMYK").save(root / "a" / "cmyk.jpg"); expect["cmyk.jpg"] = (24, 24)
    _noise(20, 16, 2, "L").save(root / "a" / "grey.png"); expect["grey.png"] = (16, 20)
    rgba = _noise(18, 12, 3, "RGBA")
    rgba.putalpha(128)
    rgba.save(root / "a" / "alpha.png"); expect["alpha.png"] = (12, 18)
    sixteen = Image.fromarray((np.arange(10 * 14).reshape(10, 14) * 400).astype(np.uint16))
    sixteen.save(root / "a" / "sixteen.png"); expect["sixteen.png"] = (10, 14)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the stored 40x20 (w x h) image is shown rotated, 20 wide and 40 high
    (root / "a" / "rotated.jpg").write_bytes(_jpeg_bytes(_noise(40, 20, 4), exif=exif)); expect["rotated.jpg"] = (40, 20)
    _noise(3000, 2000, 5).save(root / "a" / "huge.jpg", quality=80); expect["huge.jpg"] = (64, 96)  # max-res 96
    _noise(32, 32, 6).save(root / "b" / "good.jpg"); expect["good.jpg"] = (32, 32)
    whole = _jpeg_bytes(_noise(64, 48, 7))
    (root / "b" / "truncated.jpg").write_bytes(whole[:len(whole) // 2]); expect["truncated.jpg"] = None
    (root / "b" / "empty.jpg").write_bytes(b""); expect["empty.jpg"] = None
    (root / "b" / "notes.png").write_text("not an image at all"); expect["notes.png"] = None
    corrupt = bytearray(whole)
    corrupt[2:200] = os.urandom(198)
    (root / "b" / "corrupt.jpg").write_bytes(bytes(corrupt)); expect["corrupt.jpg"] = None
    return root, expect


def _stored(dst):
    from ffcv.reader import Reader
    reader = Reader(str(dst))
    meta = reader.metadata  # fields in the writer's order: f0 the image, f1 the label
    return reader, meta["f0"]["height"], meta["f0"]["width"], meta["f1"]


def test_convert_stores_what_decodes_and_reports_the_rest(awkward_tree, tmp_path):
    root, expect = awkward_tree
    dst = tmp_path / "out" / "train.beton"
    dst.parent.mkdir()
    report = convert(root, dst, ConvertOptions(max_resolution=96, num_workers=2, chunk_size=3), log=None)
    good = sorted((p for p, hw in expect.items() if hw), key=lambda n: ("a" if n != "good.jpg" else "b", n))
    reader, heights, widths, labels = _stored(dst)
    assert reader.num_samples == len(good) == report["images_written"]
    assert sorted(zip(heights.tolist(), widths.tolist())) == sorted(expect[n] for n in good)
    assert labels.tolist() == [0] * (len(good) - 1) + [1]  # sorted class folders: a -> 0, b -> 1
    skipped = {os.path.basename(s["path"]): s["reason"] for s in json.loads(sidecar(dst, "report").read_text())[
        "skipped_files"]}
    assert set(skipped) == {n for n, hw in expect.items() if hw is None}
    assert skipped["empty.jpg"] == "zero-byte file" and "truncated" in skipped["truncated.jpg"]
    classes = json.loads(sidecar(dst, "classes").read_text())
    assert classes["classes"] == ["a", "b"] and classes["images_per_class"] == [len(good) - 1, 1]
    assert not dst.with_name("train.beton.partial").exists()


def test_raw_pixels_round_trip(tmp_path):
    root = tmp_path / "src" / "c"
    root.mkdir(parents=True)
    img = _noise(17, 9, 11)
    img.save(root / "x.png")
    dst = tmp_path / "x.beton"
    convert(tmp_path / "src", dst, ConvertOptions(num_workers=1), log=None)
    reader, h, w, _ = _stored(dst)
    ptr = int(reader.metadata["f0"]["data_ptr"][0])
    pixels = np.fromfile(dst, dtype=np.uint8, count=9 * 17 * 3, offset=ptr).reshape(9, 17, 3)
    np.testing.assert_array_equal(pixels, np.asarray(img))


def test_strict_names_the_first_bad_file(awkward_tree, tmp_path):
    root, _ = awkward_tree
    dst = tmp_path / "strict.beton"
    with pytest.raises(DataError, match=r"(truncated|empty|notes|corrupt)\.(jpg|png).*--strict"):
        convert(root, dst, ConvertOptions(strict=True, num_workers=1), log=None)
    assert not dst.exists() and not dst.with_name("strict.beton.partial").exists()


def test_existing_output_is_kept_and_leftovers_are_cleaned(awkward_tree, tmp_path):
    root, _ = awkward_tree
    dst = tmp_path / "keep.beton"
    dst.write_bytes(b"precious")
    with pytest.raises(DataError, match="already exists.*--overwrite"):
        convert(root, dst, ConvertOptions(num_workers=1), log=None)
    assert dst.read_bytes() == b"precious"
    leftover = dst.with_name("keep.beton.partial")
    leftover.write_bytes(b"half a conversion")
    convert(root, dst, ConvertOptions(num_workers=1, write_mode="jpg", max_resolution=64), overwrite=True, log=None)
    assert not leftover.exists() and _stored(dst)[0].num_samples == 8


@pytest.mark.parametrize("bad,match", [({"write_mode": "png"}, "--write-mode"), ({"jpeg_quality": 0}, "--jpeg-quality"),
                                       ({"max_resolution": 0}, "--max-resolution")])
def test_bad_options_are_named(awkward_tree, tmp_path, bad, match):
    with pytest.raises(DataError, match=match):
        convert(awkward_tree[0], tmp_path / "o.beton", ConvertOptions(**bad), log=None)


def finished_before_the_signal(proc, dst) -> bool:
    """The conversion had written DST and exited 0 before the signal was sent: on a loaded machine the test's own
    polling can lag the writers by seconds. Such an attempt shows nothing about interruption; the test tries again
    (a conversion that ignores the signal instead would exit 0 only after writing everything, with the signal sent
    while DST.partial was there: it fails the test in every attempt, as none is allowed to pass this way thrice)."""
    return proc.returncode == 0 and dst.exists()


@pytest.mark.slow
def test_cli_convert_interrupted_leaves_nothing(shapes, tmp_path):
    """SIGKILL in the middle of writing: nothing under DST, no process of it left (its writers may be starting
    when the kill comes); a rerun starts clean and completes."""
    import signal
    import subprocess
    import sys
    import time
    from tests.helpers import REPO, cli_env, run_cli
    dst = tmp_path / "shapes.beton"
    partial = dst.with_name("shapes.beton.partial")
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "dogo", "convert", str(shapes / "train"), str(dst),
                                 "--num-workers", "1", "--chunk-size", "1", "--write-mode", "jpg"],
                                env=cli_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        deadline = time.time() + 60
        while not partial.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert _gone_within(proc.pid, 10) == [], "a process of the killed conversion outlived it"
        if not finished_before_the_signal(proc, dst):
            break
        dst.unlink()
    else:
        pytest.fail("each of 3 conversions finished before the kill reached it")
    assert not dst.exists()
    out = run_cli("convert", str(shapes / "train"), str(dst), "--num-workers", "1")
    assert "wrote 80 images of 10 classes" in out.stdout
    assert dst.exists() and not partial.exists()


def _shared_memory_segments() -> set[str]:
    from pathlib import Path
    return {p.name for p in Path("/dev/shm").glob("psm_*")}


def _children(pid: int) -> list[int]:
    from pathlib import Path
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        if f"\nPPid:\t{pid}\n" in text:
            found.append(int(status.parent.name))
    return found


def _session(sid: int) -> list[int]:
    """The processes of session `sid`: a process started with start_new_session and every descendant it forked,
    orphans included (an orphan changes parent, not session)."""
    from pathlib import Path
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (name)": state, ppid, pgrp, session
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _gone_within(sid: int, seconds: float) -> list[int]:
    """The processes of session `sid` still there after `seconds` (then killed, so that none outlives the test)."""
    import signal
    import time
    deadline = time.time() + seconds
    while _session(sid) and time.time() < deadline:
        time.sleep(0.05)
    left = _session(sid)
    for pid in left:  # this test's own descendants, by their ids
        os.kill(pid, signal.SIGKILL)
    return left


STARVED_CONVERSION = """
import os, signal, sys
import multiprocessing
from dogo.pipelines import convert

made = []
real_queue = multiprocessing.Queue

def starved_queue():  # FFCV makes its work queue first: nothing put in it reaches a writer
    queue = real_queue()
    if not made:
        queue.put = lambda *args, **kwargs: None
    made.append(queue)
    return queue

class KilledOnceWritersStarted(convert._RichProgress):  # FFCV draws its bar once every writer started
    def __init__(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

multiprocessing.Queue = starved_queue
convert._RichProgress = KilledOnceWritersStarted
convert.convert(sys.argv[1], sys.argv[2], convert.ConvertOptions(num_workers=2), log=None)
"""


@pytest.mark.slow
def test_writers_waiting_for_their_first_chunk_die_with_a_killed_converter(shapes, tmp_path):
    """Issue 46: the suite left an orphan `dogo convert` writer behind. A writer armed itself to die with the
    converter only at its first image; killed before that (a writer still starting, or waiting for a chunk the dead
    converter never sent), the writer waited for ever. Here every writer waits for its first chunk (its work queue
    gets nothing) when the converter is killed with SIGKILL: every process the conversion started is gone within
    seconds (its session is empty: orphans keep their session)."""
    import signal
    import subprocess
    import sys
    from tests.helpers import REPO, cli_env
    log = tmp_path / "out.txt"  # not a pipe: a writer left alive would hold it open
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", STARVED_CONVERSION, str(shapes / "train"),
                                 str(tmp_path / "s.beton")], env=cli_env(), cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, log.read_text()
    assert _gone_within(proc.pid, 10) == [], "a writer outlived the converter"


@pytest.fixture(scope="module")
def big_images(tmp_path_factory):
    """900 noisy 480 px PNGs: a conversion that takes long enough to write for a signal to reach it mid-way on a
    loaded machine (300 were outrun under pytest-xdist). Nine are written; the others are hard links to them (the
    converter decodes and writes each path all the same, and 600 MB less is written here)."""
    import os
    root = tmp_path_factory.mktemp("big") / "train"
    rng = np.random.default_rng(0)
    noise = (rng.random((480, 480, 3)) * 255).astype(np.uint8)
    for i in range(900):
        (root / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        path = root / f"c{i % 3}" / f"{i:03d}.png"
        if i < 9:
            Image.fromarray(np.roll(noise, i, axis=0)).save(path, compress_level=0)
        else:
            os.link(root / f"c{i % 3}" / f"{i % 9:03d}.png", path)
    return root


def _sigint_as_in_a_terminal():
    """SIGINT's default disposition in the converter, whatever started the suite: a shell starts background jobs
    (`make test &`, nohup) with SIGINT ignored, a Python started so keeps ignoring it (no KeyboardInterrupt), and the
    test's Ctrl-C would then be lost in every attempt, as a user's is not in a terminal."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _converting(src, dst):
    """`dogo convert` of SRC with two writers, one image per chunk: returns the process once its writers are
    working on DST.partial."""
    import subprocess
    import sys
    import time
    from tests.helpers import REPO, cli_env
    proc = subprocess.Popen([sys.executable, "-m", "dogo", "convert", str(src), str(dst),
                             "--num-workers", "2", "--chunk-size", "1", "--write-mode", "jpg", "--jpeg-quality", "100"],
                            env=cli_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_sigint_as_in_a_terminal)
    partial = dst.with_name(dst.name + ".partial")
    deadline = time.time() + 60
    while not (partial.exists() and len(_children(proc.pid)) >= 2) and time.time() < deadline \
            and proc.poll() is None:
        time.sleep(0.02)
    return proc


@pytest.mark.slow
def test_writers_start_with_ctrl_c_blocked_after_the_first_shared_memory_block():
    """FFCV's writer makes a shared-memory block and then forks its writers; the block starts multiprocessing's
    resource tracker, whose start unblocks SIGINT in the calling thread. The writers must still be born with it
    blocked: a Ctrl-C while they start would otherwise raise KeyboardInterrupt in each (a traceback per writer).
    A fresh interpreter, so that no tracker runs yet."""
    import subprocess
    import sys
    import textwrap
    from tests.helpers import REPO, cli_env
    code = textwrap.dedent("""
        import multiprocessing as mp, signal
        from multiprocessing import shared_memory
        from dogo.pipelines.convert import _interruptible

        def report(queue):
            queue.put(signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []))

        def fork_after_a_block():
            block = shared_memory.SharedMemory(create=True, size=64)
            ctx = mp.get_context("fork")
            queue = ctx.Queue()
            child = ctx.Process(target=report, args=(queue,))
            child.start()
            blocked = queue.get(timeout=30)
            child.join()
            block.close()
            block.unlink()
            return blocked

        print("blocked" if _interruptible(fork_after_a_block) else "unblocked")
    """)
    done = subprocess.run([sys.executable, "-c", code], env=cli_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip() == "blocked", done.stderr


@pytest.mark.slow
def test_one_ctrl_c_stops_convert_cleanly(big_images, shapes, tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) while the writers work: within seconds,
    exit 130 with one line, no DST and no DST.partial, no worker left, no shared memory left."""
    import os
    import signal
    import time
    from tests.helpers import run_cli
    # a small conversion first: on a fresh clone the writers compile their numba kernels, and a conversion whose
    # main process sits in the compiler takes the signal only when it is done writing
    run_cli("convert", str(shapes / "train"), str(tmp_path / "warm.beton"), "--num-workers", "2", "--write-mode", "jpg")
    before = _shared_memory_segments()
    for attempt in range(5):  # under xdist beside a test that starts many processes, polling can lag for long
        dst = tmp_path / f"shapes{attempt}.beton"
        proc = _converting(big_images, dst)
        t0 = time.time()
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=20)
        if not finished_before_the_signal(proc, dst):
            break
    else:
        pytest.fail("each of 5 conversions finished before Ctrl-C reached it: big_images is too small here")
    assert time.time() - t0 < 10
    assert proc.returncode == 130, (out, err)
    assert out.strip().splitlines()[-1] == f"interrupted: nothing was written to {dst}" and "Traceback" not in err
    assert not dst.exists() and not dst.with_name(dst.name + ".partial").exists()
    # the resource tracker, a child too, leaves once its last writer is gone
    assert _gone_within(proc.pid, 5) == [], "a process of the conversion outlived it"
    assert _shared_memory_segments() <= before


@pytest.mark.slow
def test_convert_workers_die_with_a_killed_parent(big_images, tmp_path):
    """kill -9 of the converting process: its writers die with it (they would otherwise go on writing .partial for
    minutes) and the shared memory is freed."""
    import os
    import signal
    import time
    before = _shared_memory_segments()
    proc = _converting(big_images, tmp_path / "shapes.beton")
    assert _children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # every process of its session, not only the children seen before the kill: a writer forked just before it
    # was missed that way, and left behind by the suite
    assert _gone_within(proc.pid, 10) == [], "a writer outlived its parent"
    deadline = time.time() + 10
    while time.time() < deadline and not _shared_memory_segments() <= before:
        time.sleep(0.1)
    assert _shared_memory_segments() <= before, "shared memory outlived the run"


def test_a_photo_over_ffcvs_default_page_is_stored_raw(tmp_path):
    """Issue 32 A13c: a 2000 x 1500 photo is 9 MB as raw pixels, over FFCV's default 8 MiB page, which made a writer
    raise and the conversion wait forever. The page is sized to the largest image."""
    root = tmp_path / "src" / "c"
    root.mkdir(parents=True)
    _noise(2000, 1500, 12).save(root / "big.jpg", quality=90)
    _noise(40, 30, 13).save(root / "small.jpg", quality=90)
    dst = tmp_path / "big.beton"
    report = convert(tmp_path / "src", dst, ConvertOptions(num_workers=2), log=None)
    _, h, w, _ = _stored(dst)
    assert report["images_written"] == 2 and sorted(zip(h.tolist(), w.tolist())) == [(30, 40), (1500, 2000)]


@pytest.mark.slow
def test_a_writer_that_fails_ends_the_conversion_with_one_line(tmp_path):
    """Issue 32 B3: a writer process that cannot write (here a file-size limit, as a full disk) ends the
    conversion with one line naming the cause: no hang, nothing under the output's name, no .partial, no leaked
    shared memory."""
    import resource
    import signal
    import subprocess
    import sys

    from tests.helpers import REPO, cli_env
    root = tmp_path / "src" / "c"
    root.mkdir(parents=True)
    for i in range(3):
        _noise(1000, 1000, 20 + i).save(root / f"{i}.png")
    dst = tmp_path / "out.beton"
    shm_before = set(os.listdir("/dev/shm"))

    def limit_file_size():  # writes past 1 MB fail with EFBIG (SIGXFSZ ignored, as writers inherit it)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    proc = subprocess.run([sys.executable, "-m", "dogo", "convert", str(tmp_path / "src"), str(dst),
                           "--num-workers", "2"], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                          timeout=120, preexec_fn=limit_file_size)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "a writer process failed" in out and "File too large" in out and "Traceback" not in out, out
    assert not dst.exists() and not (tmp_path / "out.beton.partial").exists()
    assert set(os.listdir("/dev/shm")) <= shm_before


@pytest.mark.slow
def test_cli_convert_prints_no_numba_fork_warnings_and_readable_skip_reasons(tmp_path):
    """Issue 32 (also seen): every `dogo convert` printed numba's "Attempted to fork from a non-main thread, the TBB
    library may be in an invalid state" twice, and a zero-byte or foreign file's reason named PIL's BytesIO."""
    from tests.helpers import run_cli
    root = tmp_path / "src" / "c"
    root.mkdir(parents=True)
    _noise(20, 20, 30).save(root / "ok.png")
    (root / "notes.jpg").write_text("not an image")
    proc = run_cli("convert", str(tmp_path / "src"), str(tmp_path / "o.beton"), "--num-workers", "1")
    said = proc.stdout + proc.stderr
    assert "TBB" not in said and "fork" not in said, said
    report = json.loads(sidecar(tmp_path / "o.beton", "report").read_text())
    assert [f["reason"] for f in report["skipped_files"]] == ["not an image PIL can read"], report
