"""SfM reference model and query localization, hloc-style on pycolmap.

    check_sfm_config(cfg.sfm)                                   # before any work
    reference = build_reference(data, cfg.sfm, out_dir, device)  # features.h5, pairs-db.txt, matches.h5, sfm/
    poses = localize_queries(data, cfg.sfm, reference, out_dir2, device)  # list[QueryPose]

Modules, one step each: features (extractors), matchers, pairs (db pairs from poses), retrieval
(query -> db), triangulation (pycolmap with known poses), reference (the reference stage),
localization (the query stage and the reusable Localizer), hloc_files (the file layouts).
"""

from splatpose.sfm.config import check_sfm_config, reference_settings
from splatpose.sfm.localization import FALLBACK_RETRIEVED, Localizer, QueryPose, localize_queries
from splatpose.sfm.reference import Reference, build_reference

__all__ = ["FALLBACK_RETRIEVED", "Localizer", "QueryPose", "Reference", "build_reference", "check_sfm_config",
           "localize_queries", "reference_settings"]
