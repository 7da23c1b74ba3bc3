"""OpenAcct: allocation and charging for research computing centers.

``openacct.shortcuts`` is the Python API an administrator scripts the center with;
``openacct.cli`` is the ``openacct`` command.
"""

__version__ = "0.1.0"
