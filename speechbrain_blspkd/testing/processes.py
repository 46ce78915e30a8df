"""Other programs run from tests: the nodes of a multi-node ``torchrun``
launch rehearsed on one machine, commands run together, and stand-alone
recipe scripts imported by path.

Not part of the library's public API (see :mod:`speechbrain_blspkd.utils.
testing`).
"""


def torchrun_node(node, nodes, port, *script_args, nproc_per_node=1):
    """The command of one node of a multi-node ``torchrun`` launch rehearsed
    on this machine: static rendezvous on ``127.0.0.1:port``, node rank
    ``node`` of ``nodes``.

    Arguments
    ---------
    node : int
        This node's rank (``--node_rank``).
    nodes : int
        Number of nodes (``--nnodes``).
    port : int
        The rendezvous port (``--master_port``), the same for every node.
    *script_args : str
        The script and its arguments.
    nproc_per_node : int
        Processes on this node.

    Returns
    -------
    list of str

    Example
    -------
    >>> torchrun_node(1, 2, 29541, "train.py", "x.yaml")[3:]
    ['--nnodes=2', '--nproc_per_node=1', '--node_rank=1', '--master_addr=127.0.0.1', '--master_port=29541', 'train.py', 'x.yaml']
    """
    import sys

    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nnodes={nodes}",
        f"--nproc_per_node={nproc_per_node}",
        f"--node_rank={node}",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        *script_args,
    ]


def run_together(commands, cwd=None, env=None, timeout=None):
    """Run ``commands`` at the same time (e.g. the nodes of a
    :func:`torchrun_node` launch) and wait for all of them.

    As soon as one command fails, the others are stopped (the nodes of a
    launch would otherwise wait for the failed one until their collective
    timeout).  Stopping kills every process the commands started, also
    those a launcher runs in sessions of their own or leaves orphaned:
    they all carry one marker in their environment.

    Arguments
    ---------
    commands : list of (list of str)
        One command line each.
    cwd : str or pathlib.Path, optional
        Working folder of every command.
    env : dict, optional
        Environment of every command (default: this process's).
    timeout : float, optional
        Seconds to wait for all of them.

    Returns
    -------
    list of (str, str)
        The stdout and stderr of each command.

    Raises
    ------
    AssertionError
        When a command exits with a non-zero status or ``timeout`` passes
        (with the tail of every command's output).

    Example
    -------
    >>> import sys
    >>> cmds = [[sys.executable, "-c", f"print({k})"] for k in range(2)]
    >>> [out for out, _ in run_together(cmds)]
    ['0\\n', '1\\n']
    >>> sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    >>> fails = [sys.executable, "-c", "raise SystemExit(3)"]
    >>> run_together([fails, sleeper], timeout=60)  # the sleeper is stopped
    Traceback (most recent call last):
    AssertionError: command 0 (exit 3):...command 1 (exit -9):...
    """
    import os
    import subprocess
    import tempfile
    import time
    import uuid

    marker = f"RUN_TOGETHER_ID={uuid.uuid4().hex}"
    name, value = marker.split("=")
    env = dict(os.environ if env is None else env, **{name: value})
    deadline = None if timeout is None else time.monotonic() + timeout
    with tempfile.TemporaryDirectory() as tmp:
        logs = [
            (open(f"{tmp}/{k}.out", "w+"), open(f"{tmp}/{k}.err", "w+"))
            for k in range(len(commands))
        ]
        procs = []
        timed_out = False
        try:
            for cmd, (out, err) in zip(commands, logs):
                procs.append(
                    subprocess.Popen(
                        cmd, cwd=cwd, env=env, stdout=out, stderr=err
                    )
                )
            while any(p.poll() is None for p in procs):
                if any(p.returncode not in (None, 0) for p in procs):
                    break  # one failed: the others would wait for it
                if deadline is not None and time.monotonic() > deadline:
                    timed_out = True
                    break
                time.sleep(0.2)
        finally:
            _kill_marked(marker)
            for proc in procs:
                proc.wait()
        texts = []
        for out, err in logs:
            texts.append([])
            for f in (out, err):
                f.seek(0)
                texts[-1].append(f.read())
                f.close()
    report = "\n".join(
        f"command {k} (exit {p.returncode}):\n{o[-3000:]}\n{e[-5000:]}"
        for k, (p, (o, e)) in enumerate(zip(procs, texts))
    )
    assert not timed_out, f"timed out after {timeout} s:\n{report}"
    assert all(p.returncode == 0 for p in procs), report
    return [tuple(t) for t in texts]


def _kill_marked(marker):
    """SIGKILL every process of this user whose environment has ``marker``
    (``NAME=value``), by its id."""
    import os
    import pathlib
    import signal

    wanted = marker.encode()
    for entry in pathlib.Path("/proc").glob("[0-9]*"):
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or another user's
            continue
        if wanted in environ.split(b"\0"):
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def load_script(path):
    """Import a stand-alone script (a recipe's ``ablate.py``) as a module.

    Recipe scripts are not in a package, so tests load them by path; a
    relative ``path`` is taken from the repository's ``recipes`` folder
    (``"SynthSpeech/speech_llm/ablate.py"``).

    Example
    -------
    >>> import pathlib, tempfile
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "tool.py"
    >>> _ = p.write_text("ANSWER = 42\\n")
    >>> load_script(p).ANSWER
    42
    """
    import importlib.util
    import pathlib

    path = pathlib.Path(path)
    if not path.is_absolute():
        path = pathlib.Path(__file__).resolve().parents[2] / "recipes" / path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
