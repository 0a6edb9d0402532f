"""Helpers for the tests that run `minisd serve` in a subprocess and drive it over HTTP or
with a headless browser. Imported as `import server_harness`: pytest's default "prepend"
import mode puts each test file's folder, tests/, on sys.path.

    with running_server("--model", str(tiny_current)) as server:     # picks a free port
        status, options = server.get("/sdapi/v1/options")             # (200, {...})
        status, body = server.post_json("/sdapi/v1/txt2img", {"prompt": "an apple"})
        assert "serving" in server.log_text()
    # here the server got SIGTERM, exited cleanly, and nothing of its process group runs

    if chromium_available():
        driver = chrome_driver(download_dir=tmp_path)
        try:
            driver.get(server.url)
        finally:
            driver.quit()

HTTP goes through the standard library's urllib with proxies turned off (the servers are all
on 127.0.0.1); 4xx and 5xx answers come back as (status, body), never as exceptions.
The browser is Debian's chromium driven by Debian's chromedriver (.ci/run installs both);
selenium-manager, which would download a driver, is never used.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"
READY_PATH = "/sdapi/v1/options"  # `minisd serve` answers it once the pipeline is loaded
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
LOG_TAIL_CHARS = 4000  # how much of a server's log a failure message shows
# Quirk: uvicorn (0.29 on) shuts down gracefully on SIGTERM, then raises SIGTERM again with the
# default handler, so a clean stop exits with -SIGTERM (shell: 143); after SIGINT it exits 0.
CLEAN_EXIT_CODES = (0, -signal.SIGTERM)

# No proxy, even if the environment names one: every server here is on this machine.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now. Subtle: another process may take
    it before the server binds it; the server then exits and running_server says so."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def http_request(url: str, method: str = "GET", data: bytes | None = None,
                 headers: dict | None = None, timeout: float = 30) -> tuple[int, dict, bytes]:
    """One request: (status, headers with lower-case names, raw body). Raises only when no HTTP
    answer came (refused connection, timeout), never for a 4xx or 5xx status."""
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return response.status, _lower(response.headers), response.read()
    except urllib.error.HTTPError as error:  # an answer all the same
        with error:
            return error.code, _lower(error.headers), error.read()


def _lower(headers) -> dict:
    return {name.lower(): value for name, value in headers.items()}


def decode_body(headers: dict, body: bytes):
    """JSON bodies parsed, other text as str, anything else (a PNG) as bytes."""
    content_type = headers.get("content-type", "")
    if "json" in content_type:
        return json.loads(body) if body else None
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return body


class ServerHandle:
    """A server process started by running_process/running_server, listening on `port`."""

    def __init__(self, process: subprocess.Popen, port: int, log_path: Path):
        self.process = process
        self.port = port
        self.url = f"http://{HOST}:{port}"
        self.log_path = log_path
        self.final_log: str | None = None  # the whole log, kept once the process has stopped

    def log_text(self) -> str:
        """Everything the process wrote to stdout and stderr so far (after the with-block too,
        when the log's temporary folder is gone)."""
        if self.final_log is not None:
            return self.final_log
        return self.log_path.read_text(errors="replace")

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        return self.log_text()[-chars:]

    def request(self, method: str, path: str, data: bytes | None = None,
                headers: dict | None = None, timeout: float = 30) -> tuple[int, dict, bytes]:
        return http_request(self.url + path, method, data, headers, timeout)

    def get(self, path: str, timeout: float = 30):
        """GET: (status, parsed JSON, or text, or bytes)."""
        status, headers, body = self.request("GET", path, timeout=timeout)
        return status, decode_body(headers, body)

    def post_json(self, path: str, payload, timeout: float = 300):
        """POST a JSON body: (status, parsed JSON, or text, or bytes)."""
        status, headers, body = self.request(
            "POST", path, json.dumps(payload).encode(), {"Content-Type": "application/json"},
            timeout)
        return status, decode_body(headers, body)


class running_process:
    """Context manager: start `argv` (which must serve HTTP on 127.0.0.1:`port`) in its own
    process group with stdout+stderr in a log file, wait until GET `ready_path` answers 200,
    yield a ServerHandle; on exit send SIGTERM, wait, and check that it exited with one of
    `clean_exit_codes` and that nothing of its process group is left (killing what is).

    Fails (AssertionError, with the log's tail) when the process exits before it is ready,
    is not ready within `timeout` seconds, exits by itself while in use, or does not stop
    within `stop_timeout` seconds of SIGTERM. `env` adds to (not replaces) os.environ.
    `log_dir` keeps the log there (say, tmp_path); by default it goes in a temporary folder
    removed on exit; handle.log_text() still answers after the with-block.
    """

    def __init__(self, argv: list[str], port: int, *, ready_path: str = READY_PATH,
                 env: dict | None = None, timeout: float = 120, stop_timeout: float = 20,
                 clean_exit_codes: tuple[int, ...] = CLEAN_EXIT_CODES,
                 log_dir: str | Path | None = None):
        self.argv, self.port, self.ready_path = list(argv), port, ready_path
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.timeout, self.stop_timeout = timeout, stop_timeout
        self.clean_exit_codes = clean_exit_codes
        self.log_dir = log_dir
        self.handle: ServerHandle | None = None

    def __enter__(self) -> ServerHandle:
        self._tmp = None if self.log_dir else tempfile.TemporaryDirectory(prefix="minisd-server-")
        log_path = Path(self.log_dir or self._tmp.name) / f"server-{self.port}.log"
        with open(log_path, "wb") as log:  # the child keeps its own copy of the descriptor
            process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, env=self.env,
                                       start_new_session=True)  # its own process group
        self.handle = ServerHandle(process, self.port, log_path)
        try:
            self._wait_ready()
        except BaseException:
            self._stop(kill_now=True)
            self._finish()
            raise
        return self.handle

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            problems = self._stop()
        finally:
            self._finish()
        # An exception from the with-body says more than what followed from it: keep it.
        if problems and exc_type is None:
            self._fail("; ".join(problems))

    def _fail(self, why: str):
        raise AssertionError(f"{' '.join(self.argv)}: {why}\n--- log tail ---\n"
                             f"{self.handle.log_tail()}")

    def _wait_ready(self) -> None:
        process, deadline = self.handle.process, time.monotonic() + self.timeout
        last = "no answer yet"
        while True:
            code = process.poll()
            if code is not None:
                self._fail(f"exited with code {code} before GET {self.ready_path} answered 200")
            try:
                status, _, _ = self.handle.request("GET", self.ready_path, timeout=5)
                if status == 200:
                    return
                last = f"last answer: HTTP {status}"
            except OSError as error:  # refused, reset, timed out: not listening yet
                last = f"last error: {error}"
            if time.monotonic() > deadline:
                self._fail(f"GET {self.ready_path} gave no 200 within {self.timeout} s ({last})")
            time.sleep(0.2)

    def _stop(self, kill_now: bool = False) -> list[str]:
        """Stop the process and its group; return what went wrong, if anything."""
        process, problems = self.handle.process, []
        code = process.poll()
        if code is not None:
            problems.append(f"exited by itself with code {code} while in use")
        else:
            process.send_signal(signal.SIGKILL if kill_now else signal.SIGTERM)
            try:
                code = process.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait()
                problems.append(f"still running {self.stop_timeout} s after SIGTERM (killed)")
            else:
                if code not in self.clean_exit_codes:
                    problems.append(f"exit code {code} after SIGTERM, "
                                    f"expected one of {self.clean_exit_codes}")
        if _group_alive(process.pid):
            os.killpg(process.pid, signal.SIGKILL)
            problems.append("processes of its group still ran after it exited (killed)")
        return problems

    def _finish(self) -> None:
        self.handle.final_log = self.handle.log_text()
        if self._tmp is not None:
            self._tmp.cleanup()


def _group_alive(pgid: int) -> bool:
    """Whether any process is left in process group `pgid` (zombies aside, they hold no port)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg also succeeds for zombies whose parent hasn't reaped them: look closer.
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process went away meanwhile
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            return True
    return False


def running_server(*args: str, port: int | None = None, env: dict | None = None,
                   timeout: float = 120, **kwargs) -> running_process:
    """`python -m minisd serve --host 127.0.0.1 --port P *args` as a running_process, ready
    once GET /sdapi/v1/options answers 200; the port is a free one unless given."""
    port = port or free_port()
    argv = [sys.executable, "-m", "minisd", "serve", "--host", HOST, "--port", str(port), *args]
    return running_process(argv, port, env=env, timeout=timeout, **kwargs)


def chromium_available() -> bool:
    """Whether Debian's chromium and chromedriver are installed (.ci/run installs them)."""
    return all(os.access(path, os.X_OK) for path in (CHROMIUM, CHROMEDRIVER))


def require_chromium() -> None:
    """Skip the calling test when chromium is missing, except under CI (CI=true), where .ci/run
    installed it and a missing browser is a failure rather than a reason to test less."""
    import pytest
    if not chromium_available():
        why = f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)


def chrome_driver(download_dir: str | Path | None = None, window_size: tuple[int, int] = (1280, 1024)):
    """A selenium Chrome webdriver on headless Debian chromium. Quit it when done (try/finally).

    Downloads go to `download_dir` without asking when it is given. Quirk: the driver's path is
    given explicitly, so selenium never runs selenium-manager (which would try to download a
    driver and a browser: no network here); SE_OFFLINE=true backs that up.
    """
    os.environ.setdefault("SE_OFFLINE", "true")
    # selenium is a test dependency: imported only when a browser is wanted.
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     f"--window-size={window_size[0]},{window_size[1]}"):
        options.add_argument(argument)
    if download_dir is not None:
        options.add_experimental_option("prefs", {
            "download.default_directory": str(Path(download_dir).resolve()),
            "download.prompt_for_download": False,
            "download.directory_upgrade": True,
        })
    return webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
