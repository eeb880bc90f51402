"""Self-contained HTML reports: one page per run, one page comparing methods (``semiseg report``)."""

from semiseg.report.compare import COMPARE_BUDGET, write_compare_report
from semiseg.report.run_report import MAX_GALLERY, RUN_REPORT_BUDGET, THUMB_PX, write_run_report

__all__ = ["COMPARE_BUDGET", "MAX_GALLERY", "RUN_REPORT_BUDGET", "THUMB_PX", "write_compare_report",
           "write_run_report"]
