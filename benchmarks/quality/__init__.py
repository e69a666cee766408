"""Quality evaluation harness: run prompt sets through a ttalign server and score them.

Modules, one job each:

- :mod:`.runs`: the ``--run`` specification (strategy, config, reward) and its parser;
- :mod:`.client`: talks to the server (chat completions, reward scoring, model lookup);
- :mod:`.suites`: the prompt-set interface and the registry of suites by name;
- :mod:`.ifeval`, :mod:`.xstest`, :mod:`.alpaca`: the three prompt sets;
- :mod:`.refusal`: the string-match refusal classifier used for XSTest;
- :mod:`.harness`: runs one spec over a suite concurrently and aggregates metrics and cost;
- :mod:`.report`: writes the JSON result, the markdown table and the PNG plot.

The command line is ``python -m ttalign.benchmarks.evaluate --help``.
"""
