"""``qmtl world report``: a self-contained HTML report of a world (or PNG charts).

``_collect.collect`` reads through the ``WorldService`` facade, ``_assemble.assemble`` (pure)
decides what is shown, ``_render.write_html``/``write_pngs`` draw it with matplotlib (one reused
figure) and the Jinja2 template shipped in ``templates/``. This package's top level stays
import-light (numpy, matplotlib and jinja2 load only in the submodules that draw): ``qmtl promote
--list`` imports it to name each pending request's report.
"""

from qmtl_core.report._paths import default_report_path, report_command, request_report, safe_name

__all__ = ["default_report_path", "report_command", "request_report", "safe_name"]
