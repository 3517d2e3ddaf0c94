"""Start the tritonserver that nvidia-pytriton ships (2.51) on a model repository, wait until it is
ready, stop it cleanly.

The route that works with a plain Python-backend repository (measured 2026-11-24, Python 3.11):
- the wheel's backends/python has no stub; the stub for this Python (python_backend_stubs/X.Y)
  goes into a backend folder of our own, next to links to libtriton_python.so and its utils;
- the stub links libpython3.X.so.1.0 without an rpath: LD_LIBRARY_PATH must name this
  interpreter's LIBDIR first, or the stub loads another libpython than the standard library it
  imports (the RLock `_recursion_count` failure of PyTriton's own proxy model);
- the stub's interpreter finds its prefix by searching PATH for python3: this interpreter's bin
  first makes it use this (virtual) environment and its site-packages;
- the stub was built against numpy 1.x: numpy 2 crashes it on BYTES tensors (the `serve` extra
  pins numpy < 2, as nvidia-pytriton itself does).
The server listens on host only (default loopback); it runs in its own session, dies with its
parent (PR_SET_PDEATHSIG), and a per-launch prefix lets us remove its shared-memory regions."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path

from ..errors import CapaError
from .triton_repo import TRITON_VERSION

PREFIX = "capa-triton-"


def tritonserver_dist() -> Path:
    """The tritonserver folder inside the installed nvidia-pytriton (found without importing it)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        raise CapaError("tritonserver: nvidia-pytriton is not installed; pip install 'capa-export[serve]'")
    dist = Path(spec.origin).parent / "tritonserver"
    if not (dist / "bin" / "tritonserver").is_file():
        raise CapaError(f"tritonserver: {dist}/bin/tritonserver is missing; reinstall nvidia-pytriton")
    return dist


def stub_path(dist: Path) -> Path:
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise CapaError(f"tritonserver: nvidia-pytriton has no Python backend stub for Python {version}; "
                        f"use Python 3.10-3.13")
    return stub


def libpython_dir() -> Path:
    libdir = Path(sysconfig.get_config_var("LIBDIR") or "")
    soname = sysconfig.get_config_var("INSTSONAME") or sysconfig.get_config_var("LDLIBRARY") or ""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") or not (libdir / soname).is_file():
        raise CapaError(f"tritonserver: {sys.executable} has no shared libpython ({libdir / soname}); the Python "
                        f"backend stub needs one: use a Python built with --enable-shared")
    return libdir


def server_environment(dist: Path) -> dict:
    env = os.environ.copy()
    libs = [str(libpython_dir()), str(dist.parent.parent / "nvidia_pytriton.libs")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + ([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else []))
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.pop("PYTHONHOME", None)
    return env


def _die_with_parent() -> None:  # runs in the child before exec
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _sweep_dead_launches() -> None:
    """Remove what a launcher killed with SIGKILL left behind (its pid is in the names)."""
    for path in [*Path(tempfile.gettempdir()).glob(PREFIX + "*"), *Path("/dev/shm").glob(PREFIX + "*")]:
        pid = path.name[len(PREFIX):].split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _processes_naming(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


class TritonServer:
    """tritonserver on repository: start() returns once /v2/health/ready answers (every model
    loaded), stop() signals it and waits (then kills); a context manager. log: a file for the
    server's output (default: inherited)."""

    def __init__(self, repository: str | Path, *, host: str = "127.0.0.1", http_port: int = 8000,
                 grpc_port: int = 8001, metrics_port: int = 8002, log: str | Path | None = None,
                 exit_timeout_s: int = 20):
        for name, port in (("http_port", http_port), ("grpc_port", grpc_port)):
            if not 1 <= port <= 65535:
                raise CapaError(f"{name}={port} must be a TCP port, 1-65535")
        if not 0 <= metrics_port <= 65535:
            raise CapaError(f"metrics_port={metrics_port} must be a TCP port, or 0 for no metrics")
        self.repository = Path(repository).resolve()
        if not self.repository.is_dir():
            raise CapaError(f"model repository {repository} is not a folder; write one with capa-export triton-repo")
        self.host, self.http_port, self.grpc_port, self.metrics_port = host, http_port, grpc_port, metrics_port
        self.log, self.exit_timeout_s = (Path(log) if log else None), exit_timeout_s
        self.process: subprocess.Popen | None = None
        self.runtime: Path | None = None
        self.returncode: int | None = None

    @property
    def url(self) -> str:
        return f"{self.host}:{self.http_port}"

    def command(self, backends: Path, shm_prefix: str, dist: Path) -> list[str]:
        cmd = [str(dist / "bin" / "tritonserver"), f"--model-repository={self.repository}",
               f"--backend-directory={backends}",
               f"--http-address={self.host}", f"--http-port={self.http_port}",
               f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
               "--exit-on-error=true", "--strict-readiness=true", f"--exit-timeout-secs={self.exit_timeout_s}",
               f"--backend-config=python,shm-region-prefix-name={shm_prefix}"]
        if self.metrics_port:
            cmd += ["--allow-metrics=true", "--allow-gpu-metrics=false", f"--metrics-address={self.host}",
                    f"--metrics-port={self.metrics_port}"]
        else:
            cmd += ["--allow-metrics=false"]
        return cmd

    def start(self, timeout_s: float = 300) -> float:
        """Start the server; seconds until it was ready. CapaError when it exits or is not ready in time."""
        dist = tritonserver_dist()
        stub = stub_path(dist)
        env = server_environment(dist)
        _sweep_dead_launches()
        self.runtime = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))
        python = self.runtime / "backends" / "python"
        python.mkdir(parents=True)
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            (python / name).symlink_to(dist / "backends" / "python" / name)
        shutil.copy2(stub, python / "triton_python_backend_stub")
        self.shm_prefix = f"{PREFIX}{os.getpid()}-{self.runtime.name[-8:]}-"
        log = open(self.log, "ab") if self.log else None
        try:
            # own session: a terminal's Ctrl-C reaches the launcher, which forwards it once
            self.process = subprocess.Popen(self.command(self.runtime / "backends", self.shm_prefix, dist), env=env,
                                            start_new_session=True, preexec_fn=_die_with_parent,
                                            stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT if log else None)
        finally:
            if log:
                log.close()
        return self._wait_ready(timeout_s)

    def _wait_ready(self, timeout_s: float) -> float:
        start = time.monotonic()
        url = f"http://{self.url}/v2/health/ready"
        while time.monotonic() - start < timeout_s:
            if self.process.poll() is not None:
                code = self.process.returncode
                self.stop()
                raise CapaError(f"tritonserver exited with status {code} before it was ready: {self._log_error()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return time.monotonic() - start
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise CapaError(f"tritonserver was not ready after {timeout_s:.0f} s: {self._log_error()}")

    def _log_error(self) -> str:
        if not self.log or not self.log.is_file():
            return "see its log above"
        lines = self.log.read_text(errors="replace").splitlines()
        errors = [line for line in lines if line.startswith("E") or "failed to load" in line]
        return (errors[0] if errors else (lines[-1] if lines else "no output"))[:400] + f" (log: {self.log})"

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float | None = None) -> int | None:
        """Signal the server (it finalises its models and exits), wait, kill it after timeout_s;
        remove its stub processes' leftovers. Returns its exit status."""
        if self.process is None:
            return self.returncode
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            self.returncode = self.process.wait(timeout=timeout_s or self.exit_timeout_s + 10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.returncode = self.process.wait()
        self.process = None
        # stubs notice the server is gone through their health check and exit within about a second
        deadline = time.monotonic() + 5
        while _processes_naming(str(self.runtime)) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in _processes_naming(str(self.runtime)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.runtime, ignore_errors=True)
        for path in Path("/dev/shm").glob(self.shm_prefix + "*"):
            path.unlink(missing_ok=True)
        return self.returncode

    def leftover_processes(self) -> list[int]:
        return _processes_naming(str(self.runtime)) if self.runtime else []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def serve(repository: Path, *, ready_timeout_s: float = 300, announce=print, **server) -> int:
    """Run tritonserver on repository until SIGINT/SIGTERM (forwarded once) or until it exits;
    its exit status."""
    stopping = {"signal": None, "ready": False}
    server = TritonServer(repository, **server)

    def forward(signum, _frame):
        if not stopping["ready"]:  # still loading: give up the start (finally stops the server)
            raise KeyboardInterrupt
        stopping["signal"] = signum

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        seconds = server.start(ready_timeout_s)
        stopping["ready"] = True
        metrics = f", metrics http://{server.host}:{server.metrics_port}/metrics" if server.metrics_port else ""
        announce(f"ready in {seconds:.1f} s: HTTP http://{server.url}, gRPC {server.host}:{server.grpc_port}{metrics} "
                 f"(Triton {TRITON_VERSION}, model repository {server.repository})")
        while server.running() and stopping["signal"] is None:
            time.sleep(0.2)
        if stopping["signal"] is None:
            announce(f"tritonserver exited by itself with status {server.process.returncode}")
        code = server.stop(stopping["signal"] or signal.SIGTERM)
        # status 1 after a stop request: clients kept connections open past the exit timeout, or a
        # model did not finalise in it
        note = "" if code == 0 else ": the exit timeout expired (open client connections?); see its log"
        announce(f"stopped (tritonserver status {code}{note})")
        return 0 if stopping["signal"] is not None else 1
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)

