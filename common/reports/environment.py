"""The one environment block every report carries right after its weights lines: when, on what CPU (the
flags that pick the kernels, cores, L3, RAM) and with which versions. Writers call `environment_lines`."""
from __future__ import annotations

from common.core.env import KEY_FLAGS, PACKAGES

HEADING = "## Environment"


def _gib(n: int | None) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n else "?"


def _mib(n: int | None) -> str:
    return f"{n / (1 << 20):.0f} MiB" if n else "?"


def environment_lines(environment: dict | None = None, threads: int | None = None) -> list[str]:
    """Markdown lines of the block for `environment` (a core.env.environment_record; recorded now if None)."""
    if environment is None:
        from common.core.env import default_threads, environment_record

        environment = environment_record(threads or default_threads())
    env = environment
    flags = env.get("key_flags", {})
    packages = env.get("packages", {})
    thread_vars = ", ".join(f"{k}={v}" for k, v in env.get("thread_env", {}).items() if v) or "none set"
    return [HEADING, "",
            f"- Run: {env.get('date', '?')}; git {env.get('git_commit', '?')}; {env.get('os', '?')}; "
            f"threads {env.get('threads', '?')} ({thread_vars}); load average {env.get('load_average', '?')} "
            "(1 / 5 / 15 min, when recorded: other work on these CPUs lowers every number)",
            f"- CPU: {env.get('cpu_model', '?')}; {env.get('cpus_online', '?')} CPUs online, "
            f"{env.get('cpus_affinity', '?')} in the affinity mask ({env.get('affinity', '?')}); "
            f"L3 {_mib(env.get('l3_bytes'))}; RAM {_gib(env.get('ram_bytes'))}",
            "- CPU flags: " + ", ".join(
                f"{f} {'present' if flags[f] else 'absent'}" if f in flags else f"{f} ?" for f in KEY_FLAGS),
            f"- Versions: python {env.get('python', '?')}, "
            + ", ".join(f"{name} {packages.get(name, '?')}" for name in PACKAGES), ""]
