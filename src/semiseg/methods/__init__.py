"""Every method module is imported here so that it registers itself."""

from semiseg.methods import (
    atso,  # noqa: F401
    dst_cbc,  # noqa: F401
    ensemble_st,  # noqa: F401
    fixmatch,  # noqa: F401
    gta_seg,  # noqa: F401
    mean_teacher,  # noqa: F401
    momentum_pl,  # noqa: F401
    self_training,  # noqa: F401
    st_match,  # noqa: F401
    supervised,  # noqa: F401
    unimatch,  # noqa: F401
)
