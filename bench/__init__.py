"""sknock's benchmark, run as ``python -m bench`` from the repository's root, as root (bench/run.sh).

One module per job:

* ``__main__``: the command line; runs everything and writes bench/results/<date>-<time>.{json,md,png}.
* :mod:`bench.phases`: the measured phases against one server, and sknock's list of them.
* :mod:`bench.fwknop`: fwknopd side by side: its packets, its process, its phases.
* :mod:`bench.lab`: the PKI, prebuilt knocks, the two hosts, sknock's server process, the memory and
  CPU time of a server's processes.
* :mod:`bench.watch`: what sees grants in the kernel.
* :mod:`bench.micro`: in-process figures: the crypto bound, the verifier's rate, the client's costs.
* :mod:`bench.report`: the markdown table, the plot, py-spy profile summaries.

Programs run inside a namespace (stdlib only until they time something, started as ``python -m``):
:mod:`bench.sender` (the load generator), :mod:`bench.legacy_poller` (legacy iptables' rule count) and
:mod:`bench.clientcost` (the client's import and knock times).
"""
