"""Memory limits read from /proc and /sys (fake trees written to tmp dirs), RLIMIT_AS, a platform
without `resource`, and the budget and refusals that follow from the tightest limit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

from runtime.base import system
from runtime.base.errors import StepstreamError
from runtime.base.memory_limit import (
    MemoryLimit,
    Mount,
    cgroup_limits,
    group_dirs,
    parse_mountinfo,
    parse_proc_cgroup,
    process_limits,
    rlimit_as,
    size_text,
    tightest,
)

MiB = 2**20
ROOT = Path(__file__).resolve().parent.parent
NO_LIMIT_V1 = str(2**63 - 4096)  # what cgroup v1 writes for "no limit"


def fake_tree(tmp: Path, proc_cgroup: str, mountinfo: str, files: dict[str, str]) -> tuple[Path, Path]:
    """(proc_self, root) of a fake machine: /proc/self/{cgroup,mountinfo} and files under root."""
    proc = tmp / "proc" / "self"
    proc.mkdir(parents=True)
    (proc / "cgroup").write_text(proc_cgroup)
    (proc / "mountinfo").write_text(mountinfo)
    for rel, text in files.items():
        p = tmp / rel.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return proc, tmp


V1_MOUNTS = textwrap.dedent("""\
    25 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw
    31 25 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
    32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
    35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
""")
V1_CGROUP = "12:cpu,cpuacct:/\n4:memory:/slurm/job7/step0\n0::/\n"


def v1_group(path: str, limit: str, usage: int, inactive: int = 0) -> dict[str, str]:
    d = "/sys/fs/cgroup/memory" + path.rstrip("/")
    return {f"{d}/memory.limit_in_bytes": limit + "\n", f"{d}/memory.usage_in_bytes": f"{usage}\n",
            f"{d}/memory.stat": f"cache 0\nrss {usage}\ninactive_file 1\ntotal_inactive_file {inactive}\n"}


# ----------------------------------------------------------------------------- parsing

def test_proc_cgroup_finds_the_memory_controller_and_the_unified_path():
    assert parse_proc_cgroup(V1_CGROUP) == {"v1": "/slurm/job7/step0", "v2": "/"}
    assert parse_proc_cgroup("0::/user.slice/user-0.slice/session-1.scope\n") == {
        "v2": "/user.slice/user-0.slice/session-1.scope"}
    assert parse_proc_cgroup("3:cpu,memory:/x\n") == {"v1": "/x"}  # co-mounted controllers
    assert parse_proc_cgroup("garbage\n5:cpuset:/a\n") == {}


def test_mountinfo_keeps_the_memory_hierarchy_and_cgroup2_and_unescapes_paths():
    escaped = "50 31 0:40 /docker/a\\040b /sys/fs/cgroup/my\\040mem rw - cgroup cgroup rw,memory\n"
    mounts = parse_mountinfo(V1_MOUNTS + escaped)
    assert mounts == [Mount("/", "/sys/fs/cgroup/memory", "v1"), Mount("/", "/sys/fs/cgroup/unified", "v2"),
                      Mount("/docker/a b", "/sys/fs/cgroup/my mem", "v1")]


def test_group_dirs_walk_up_to_the_mount_point(tmp_path):
    dirs = group_dirs("/slurm/job7/step0", Mount("/", "/sys/fs/cgroup/memory", "v1"), tmp_path)
    base = tmp_path / "sys/fs/cgroup/memory"
    assert dirs == [(base / "slurm/job7/step0", "/slurm/job7/step0"), (base / "slurm/job7", "/slurm/job7"),
                    (base / "slurm", "/slurm"), (base, "/")]
    # A container sees its own group mounted as the root of the hierarchy.
    assert group_dirs("/docker/abc", Mount("/docker/abc", "/sys/fs/cgroup/memory", "v1"), tmp_path) == [
        (base, "/docker/abc")]
    assert group_dirs("/docker/abc/inner", Mount("/docker/abc", "/sys/fs/cgroup/memory", "v1"), tmp_path) == [
        (base / "inner", "/docker/abc/inner"), (base, "/docker/abc")]
    # Outside the mounted subtree (a cgroup namespace): the mount point alone.
    assert group_dirs("/", Mount("/kubepods/pod1", "/sys/fs/cgroup", "v2"), tmp_path) == [
        (tmp_path / "sys/fs/cgroup", "/kubepods/pod1")]


# ----------------------------------------------------------------------------- reading limits

def test_v1_nested_hierarchy_the_tightest_level_decides(tmp_path):
    files = {**v1_group("/", NO_LIMIT_V1, 5000 * MiB),
             **v1_group("/slurm", NO_LIMIT_V1, 900 * MiB),
             **v1_group("/slurm/job7", str(500 * MiB), 450 * MiB, inactive=30 * MiB),
             **v1_group("/slurm/job7/step0", str(1024 * MiB), 300 * MiB, inactive=100 * MiB)}
    proc, root = fake_tree(tmp_path, V1_CGROUP, V1_MOUNTS, files)
    limits = cgroup_limits(proc, root)
    assert [(l.where, l.limit, l.used, l.free) for l in limits] == [
        ("/slurm/job7/step0", 1024 * MiB, 200 * MiB, 824 * MiB),  # inactive page cache is not "used"
        ("/slurm/job7", 500 * MiB, 420 * MiB, 80 * MiB)]
    assert tightest(limits).text() == "cgroup v1 limit /slurm/job7: 500 MiB, 420 MiB used"


def test_v2_max_means_no_limit_and_a_parent_limit_binds(tmp_path):
    mounts = "29 24 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
    d = "/sys/fs/cgroup"
    files = {f"{d}/cgroup.procs": "1\n",  # the root group has no memory.max
             f"{d}/system.slice/memory.max": f"{2048 * MiB}\n", f"{d}/system.slice/memory.current": f"{700 * MiB}\n",
             f"{d}/system.slice/memory.stat": f"anon 1\ninactive_file {200 * MiB}\nactive_file 5\n",
             f"{d}/system.slice/job.service/memory.max": "max\n",
             f"{d}/system.slice/job.service/memory.current": f"{100 * MiB}\n"}
    proc, root = fake_tree(tmp_path, "0::/system.slice/job.service\n", mounts, files)
    (lim,) = cgroup_limits(proc, root)
    assert (lim.kind, lim.where, lim.limit, lim.used, lim.free) == (
        "cgroup v2", "/system.slice", 2048 * MiB, 500 * MiB, 1548 * MiB)
    assert lim.text() == "cgroup v2 limit /system.slice: 2048 MiB, 500 MiB used"


def test_container_v1_and_namespaced_v2_read_the_mount_point(tmp_path):
    mounts = "35 31 0:32 /docker/abc /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory\n"
    files = {"/sys/fs/cgroup/memory/memory.limit_in_bytes": f"{256 * MiB}\n",
             "/sys/fs/cgroup/memory/memory.usage_in_bytes": f"{16 * MiB}\n"}  # no memory.stat: nothing inactive
    proc, root = fake_tree(tmp_path / "a", "9:memory:/docker/abc\n", mounts, files)
    assert [(l.where, l.free) for l in cgroup_limits(proc, root)] == [("/docker/abc", 240 * MiB)]
    mounts = "29 24 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    files = {"/sys/fs/cgroup/memory.max": f"{300 * MiB}\n", "/sys/fs/cgroup/memory.current": f"{50 * MiB}\n"}
    proc, root = fake_tree(tmp_path / "b", "0::/\n", mounts, files)
    assert [(l.kind, l.free) for l in cgroup_limits(proc, root)] == [("cgroup v2", 250 * MiB)]


def test_missing_or_unreadable_files_mean_no_limit(tmp_path):
    # The memory hierarchy is mounted but the group's files are missing, or hold junk.
    files = {"/sys/fs/cgroup/memory/slurm/job7/step0/memory.limit_in_bytes": "junk\n",
             "/sys/fs/cgroup/memory/slurm/job7/memory.limit_in_bytes": f"{100 * MiB}\n"}  # usage missing
    proc, root = fake_tree(tmp_path / "a", V1_CGROUP, V1_MOUNTS, files)
    assert cgroup_limits(proc, root) == []
    # No /proc at all (another OS), or no cgroup mounted.
    assert cgroup_limits(tmp_path / "nowhere", tmp_path) == []
    proc, root = fake_tree(tmp_path / "b", V1_CGROUP, "25 1 8:1 / / rw - ext4 /dev/sda1 rw\n", {})
    assert cgroup_limits(proc, root) == []


def test_the_tightest_limit_wins_over_the_host(tmp_path):
    files = v1_group("/slurm/job7/step0", str(243 * MiB), 40 * MiB)
    proc, root = fake_tree(tmp_path, V1_CGROUP, V1_MOUNTS, files)
    limits = process_limits(0.10, 2**30, proc, root)
    assert limits[0].kind == "available memory" and limits[0].reserve >= 2**30
    lim = tightest(limits)
    assert (lim.kind, lim.free) == ("cgroup v1", 203 * MiB)
    assert lim.text() == "cgroup v1 limit /slurm/job7/step0: 243 MiB, 40 MiB used"


def test_sizes_in_words():
    assert (size_text(5 * MiB // 2), size_text(243 * MiB), size_text(45 * 2**30)) == ("2.5 MiB", "243 MiB", "45.0 GiB")


# ----------------------------------------------------------------------------- RLIMIT_AS, no `resource`

def test_rlimit_as_counts_the_address_space_already_mapped():
    code = textwrap.dedent("""
        import resource
        from runtime.base import system
        vms = system.psutil.Process().memory_info().vms
        from runtime.base.memory_limit import AS_RESERVE
        resource.setrlimit(resource.RLIMIT_AS, (vms + AS_RESERVE + 300 * 2**20, resource.RLIM_INFINITY))
        lim = system.memory_limit()
        print(lim.kind, lim.limit, lim.free, vms + AS_RESERVE + 300 * 2**20)
        print(lim.text())
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    kind, limit, free, asked = r.stdout.split("\n")[0].split()
    assert kind == "RLIMIT_AS" and int(limit) == int(asked)
    # less what the few lines above mapped, and the address space threads and libraries reserve
    # beyond their RSS (without it, OpenBLAS spun on failing mmaps and LLVM aborted under ulimit -v)
    assert 250 * MiB < int(free) <= 300 * MiB
    assert r.stdout.split("\n")[1].startswith("RLIMIT_AS ")
    assert r.stdout.split("\n")[1].endswith(", 1024 MiB kept for threads and libraries")


def test_a_file_larger_than_the_address_space_left_names_the_limit(tmp_path):
    """The whole file is mapped: under a `ulimit -v` smaller than it, the map fails, and the
    message said only "Cannot allocate memory"."""
    model = ROOT / "runtime" / "data" / "step35-mini-q4_k_m.gguf"
    code = textwrap.dedent(f"""
        import resource
        from runtime.base import system
        from runtime.base.errors import StepstreamError
        from runtime.base.gguf_file import GGUFModelFile
        vms = system.psutil.Process().memory_info().vms
        resource.setrlimit(resource.RLIMIT_AS, (vms + 4 * 2**20, resource.RLIM_INFINITY))  # less than the file
        try:
            GGUFModelFile({str(model)!r})
        except StepstreamError as e:
            print(e)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{model}: cannot map the file ([Errno 12] Cannot allocate memory): the address space "
                               f"limit (RLIMIT_AS, `ulimit -v`) is "), r.stdout
    assert r.stdout.rstrip().endswith("file is mapped; raise it above the file's size plus a few GiB")


def test_a_platform_without_resource_imports_and_measures(monkeypatch, tmp_path):
    """Windows has no `resource` module, and no /proc."""
    import builtins
    import importlib

    real_open = builtins.open

    def no_proc(path, *a, **k):
        if str(path).startswith("/proc"):
            raise FileNotFoundError(path)
        return real_open(path, *a, **k)

    monkeypatch.setitem(sys.modules, "resource", None)  # `import resource` raises ImportError
    fresh = importlib.reload(system)
    try:
        monkeypatch.setattr(fresh, "open", no_proc, raising=False)
        assert fresh.peak_rss_bytes() > 0
        assert rlimit_as(tmp_path) == []
        assert fresh.memory_limit().kind == "available memory"
    finally:
        monkeypatch.undo()
        importlib.reload(system)


# ----------------------------------------------------------------------------- the budget that follows

def fake_limit(monkeypatch, free: int, kind: str = "cgroup v1", reserve: int = 0) -> MemoryLimit:
    lim = MemoryLimit(kind, free, free + 40 * MiB, 40 * MiB, "/fake" if kind.startswith("cgroup") else "",
                      reserve=reserve)
    monkeypatch.setattr(system, "memory_limits", lambda: [lim])
    return lim


def _sizes(path):
    """(file bytes, resident weights, the runtime's needs under a cgroup, the smallest cache) at
    the default options."""
    from offload.expert_table import build_expert_table
    from offload.placement import resident_size, runtime_needs
    from offload.provider import slot_bytes_for
    from runtime.base.config import ModelConfig
    from runtime.base.gguf_file import GGUFModelFile
    from runtime.base.options import RuntimeOptions
    from runtime.model.weights import load_weights

    f = GGUFModelFile(path)
    cfg = ModelConfig.from_gguf(f)
    resident = resident_size(load_weights(f, cfg), cfg.n_layers)
    runtime = runtime_needs(cfg, min(cfg.context_length, 4096), 16, MemoryLimit("cgroup v1", 0, 0, 0),
                            RuntimeOptions().kv_types, RuntimeOptions().n_batch, tokenizer_built=True)  # as load
    slot = slot_bytes_for(build_expert_table(f, cfg))
    smallest = (cfg.n_expert_used + max(1, cfg.n_expert_used * 3 // 4)) * slot
    return f.nbytes, resident, runtime, smallest


def test_runtime_needs_count_the_kv_cache_and_the_hosts_reserve(tiny_gguf):
    from offload.placement import (
        ACTIVATION_BYTES_PER_WIDTH,
        LIBRARY_PAGES,
        RUNTIME_ANON,
        START_ANON,
        TOKENIZER_BYTES_PER_TOKEN,
        WIDTH_BYTES,
        kv_cache_bytes,
        runtime_needs,
    )
    from runtime.base.config import ModelConfig
    from runtime.base.gguf_file import GGUFModelFile

    cfg = ModelConfig.from_gguf(GGUFModelFile(tiny_gguf("q4_k_m")))
    # tiny: block 0 full-attention, 1-3 sliding (window 16), one KV head of 128 dims
    assert [cfg.sliding[i] for i in range(4)] == [False, True, True, True] and cfg.window == 16
    assert kv_cache_bytes(cfg, 4096, 16) == 2 * 4 * 128 * (4096 + 3 * 32)
    needs = runtime_needs(cfg, 4096, 16, MemoryLimit("cgroup v1", 0, 0, 0))  # n_batch 64, no tokenizer yet
    own = RUNTIME_ANON + cfg.hidden * (64 * ACTIVATION_BYTES_PER_WIDTH + WIDTH_BYTES) + cfg.vocab * TOKENIZER_BYTES_PER_TOKEN
    # at start: loaded and warmed up (START_ANON), and one prefill chunk's activations
    act = cfg.hidden * (64 * ACTIVATION_BYTES_PER_WIDTH + WIDTH_BYTES)
    assert needs.start == START_ANON + act + cfg.vocab * TOKENIZER_BYTES_PER_TOKEN + 2 * 4 * 128 * (256 + 3 * 32)
    assert needs.full == own + LIBRARY_PAGES + 2 * 4 * 128 * (4096 + 3 * 32)
    built = runtime_needs(cfg, 4096, 16, MemoryLimit("cgroup v1", 0, 0, 0), n_batch=512, tokenizer_built=True)
    assert built.start - needs.start == cfg.hidden * (512 - 64) * ACTIVATION_BYTES_PER_WIDTH - cfg.vocab * TOKENIZER_BYTES_PER_TOKEN
    assert built.full - needs.full == cfg.hidden * (512 - 64) * ACTIVATION_BYTES_PER_WIDTH - cfg.vocab * TOKENIZER_BYTES_PER_TOKEN
    host = runtime_needs(cfg, 4096, 16, MemoryLimit("available memory", 0, 0, 0, reserve=2**30))
    # the host's reserve covers the runtime's own memory, never the KV cache (12 GiB at 256K on the real model)
    assert (host.start, host.full) == (2 * 4 * 128 * (256 + 3 * 32), 2 * 4 * 128 * (4096 + 3 * 32))


def test_default_budget_is_what_the_cgroup_leaves(tiny_gguf, monkeypatch):
    from runtime.loader import load

    path = tiny_gguf("q4_k_m")
    size, resident, runtime, smallest = _sizes(path)
    free = resident + runtime.full + 2 * smallest  # more than the smallest cache, less than every expert
    assert free < size + runtime.full  # the mapped file would not fit beside the runtime: stream
    fake_limit(monkeypatch, free)
    m = load(path)
    try:
        p = m.placement
        assert p is not None and p.resident_bytes == resident
        assert p.budget_bytes == free - resident - runtime.full
        assert p.cache_bytes <= p.budget_bytes < p.expert_bytes
        assert p.text().startswith(f"placement: budget {size_text(p.budget_bytes)} "
                                   f"(cgroup v1 limit /fake: {size_text(free + 40 * MiB)}, 40 MiB used); ")
    finally:
        m.close()


def test_auto_keeps_experts_in_ram_when_file_and_runtime_fit(tiny_gguf, monkeypatch):
    from runtime.loader import load
    from runtime.model.experts import InMemoryExperts

    path = tiny_gguf("q4_k_m")
    size, _, runtime, _ = _sizes(path)
    fake_limit(monkeypatch, size + runtime.full + MiB)
    m = load(path)
    assert isinstance(m.provider, InMemoryExperts) and m.placement is None
    m.close()


def test_the_hosts_reserve_covers_the_runtime(tiny_gguf, monkeypatch):
    from runtime.loader import load

    path = tiny_gguf("q4_k_m")
    size, resident, runtime, _ = _sizes(path)
    free = size // 2 + runtime.kv_bytes
    fake_limit(monkeypatch, free, kind="available memory", reserve=2**30)
    m = load(path)
    try:
        assert m.placement.budget_bytes == free - resident - runtime.kv_bytes  # the KV cache is not the reserve's
        assert "(available memory " in m.placement.text()
    finally:
        m.close()


def test_refused_when_the_smallest_cache_cannot_start(tiny_gguf, monkeypatch):
    from runtime.loader import load

    path = tiny_gguf("q4_k_m")
    _, resident, runtime, smallest = _sizes(path)
    need = resident + runtime.start + smallest
    fake_limit(monkeypatch, need - 1)
    with pytest.raises(StepstreamError) as e:
        load(path)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path.name}: streaming needs {size_text(need)} ({size_text(resident)} of resident "
                          f"weights, {size_text(smallest)} for the smallest expert cache: 7 experts, "
                          f"{size_text(runtime.start)} for the runtime) but the cgroup v1 limit /fake: ")
    assert msg.endswith(f"leaves {size_text(need - 1)}")
    # One byte more: it could start, but a full context would not fit beside the smallest cache, so
    # it is refused (it started, and would have been OOM-killed as the context filled).
    fake_limit(monkeypatch, need)
    full = resident + runtime.full + smallest
    with pytest.raises(StepstreamError) as e:
        load(path)
    assert str(e.value).startswith(f"{path.name}: a full context of 4096 positions needs {size_text(full)} (")
    assert str(e.value).endswith("use a smaller -c, a smaller KV type (-ctk/-ctv q8_0), or more memory")
    fake_limit(monkeypatch, full)  # room for a full context: it starts, with the smallest cache
    m = load(path)
    assert m.placement.budget_bytes == smallest
    m.close()


def test_an_asked_budget_that_cannot_start_is_refused(tiny_gguf, monkeypatch):
    from runtime.loader import load

    path = tiny_gguf("q4_k_m")
    _, resident, runtime, _ = _sizes(path)
    fake_limit(monkeypatch, resident + runtime.start + 2 * MiB)
    with pytest.raises(StepstreamError) as e:
        load(path, ram_budget="3MiB")
    msg = str(e.value)
    assert f"a RAM budget of 3.0 MiB needs {size_text(resident + runtime.start + 3 * MiB)} with " in msg
    full_room = resident + runtime.start + 2 * MiB - resident - runtime.full
    assert msg.endswith(f"the largest budget that fits is 2.0 MiB to start, {size_text(max(0, full_room))} with a "
                        f"full context of 4096 positions")
    # Beyond the full-context allowance, but it can start: taken as asked, with a warning that
    # names the largest budget a full context leaves room for (a review: OOM-killed at 150 of 171
    # MiB "that fit", by a long prompt).
    full_room = resident + runtime.start + 2 * MiB - resident - runtime.full
    with pytest.warns(UserWarning, match=f"leaves no room for a full context of 4096 positions .* the largest budget "
                                         f"that does is {size_text(max(0, full_room))}"):
        m = load(path, ram_budget="2MiB")
    assert m.placement.budget_bytes == 2 * MiB and "(asked for; cgroup v1 limit /fake" in m.placement.text()
    m.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within the full-context room: no warning
        fake_limit(monkeypatch, resident + runtime.full + 2 * MiB)
        load(path, ram_budget="2MiB").close()


def test_a_model_on_tmpfs_is_mapped_not_streamed(tmp_path, monkeypatch):
    """A model on tmpfs (/dev/shm, a container's memory-backed volume) is memory already:
    streaming it copied experts from memory to memory, 3.5x slower than mapping it at the same
    memory use (a review's measurement). With the memory that makes a file on disk stream,
    the tmpfs file is mapped."""
    import shutil

    import runtime
    from runtime.base import system

    fake = tmp_path / "mountinfo"
    fake.write_text("22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"
                    "30 22 0:25 / /dev/shm rw,nosuid - tmpfs tmpfs rw\n"
                    "31 22 0:26 / /mnt/my\\040models rw - tmpfs none rw\n")
    assert system.filesystem_type("/dev/shm/m.gguf", str(fake)) == "tmpfs"
    assert system.filesystem_type("/mnt/my models/m.gguf", str(fake)) == "tmpfs"
    assert system.filesystem_type("/home/u/m.gguf", str(fake)) == "ext4"
    assert system.filesystem_type("/x", str(tmp_path / "none")) is None
    if system.filesystem_type("/dev/shm") != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm here")
    model = Path(runtime.__file__).parent / "data" / "step35-mini-q4_k_m.gguf"
    shm = Path("/dev/shm") / f"stepstream-test-{os.getpid()}.gguf"
    shutil.copy(model, shm)
    try:
        from offload.placement import runtime_needs
        from runtime.base.config import ModelConfig
        from runtime.base.gguf_file import GGUFModelFile

        cfg = ModelConfig.from_gguf(GGUFModelFile(model))
        need = runtime_needs(cfg, 256, 16, system.memory_limit(), ("f16", "f16"), 64, tokenizer_built=True).full
        size = model.stat().st_size
        monkeypatch.setattr(system, "usable_memory", lambda: need + size // 2)  # the file on disk: no room
        on_disk = runtime.load(model, n_ctx=256)
        in_memory = runtime.load(shm, n_ctx=256)
        assert on_disk.placement is not None and in_memory.placement is None
        ids = on_disk.tokenize("def f(x):")
        assert np.array_equal(on_disk.logits(ids), in_memory.logits(ids))
    finally:
        shm.unlink()


def test_an_address_space_limit_never_makes_auto_stream(tiny_gguf, monkeypatch):
    """Under RLIMIT_AS the file is mapped already and streaming maps it too, beside a cache: auto
    chose to stream when the file looked too large for the address space left, then refused a
    model that runs mapped (a review, under `ulimit -v`)."""
    from runtime.loader import load

    path = tiny_gguf("q4_k_m")
    file_bytes, resident, runtime, smallest = _sizes(path)
    free = file_bytes // 2 + runtime.full  # the file cannot fit beside the runtime "again"
    fake_limit(monkeypatch, free, kind="cgroup v1")
    m = load(path)
    assert m.placement is not None  # a cgroup counts the file's pages: it streams
    m.close()
    fake_limit(monkeypatch, free, kind="RLIMIT_AS")
    m = load(path)
    assert m.placement is None  # mapped, as --no-stream runs it
    m.close()
