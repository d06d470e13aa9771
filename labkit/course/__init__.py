"""The instructor's tools, imported by no notebook: the ``labkit`` command, the course runner,
regrade and its nbval plugin, student copies, the results summary, the lab sources and Colab set-up."""
