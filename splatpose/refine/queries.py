"""The pipeline's refine stage: every query's final pose, through the splats.

Per query (:class:`PoseSettler`, shared with the detector):

- PnP localized it: its pose is refined against the image (:class:`PoseRefiner`); path ``"pnp"``;
- PnP failed, or its refined pose does not line up with the image (silhouette IoU or colour below the
  ``refine.recovery`` thresholds): the pose is recovered through the splats
  (:class:`~splatpose.refine.recovery.PoseRecovery`); path ``"recovered"`` when the result lines up;
- PnP's refined pose and the recovery's both fail the check: one of them is kept, flagged as not lining up
  (``refine.recovery.when_neither_lines_up``: PnP's, or the recovery's when only its silhouette passes);
- nothing lines up: path ``"failed"``; the query is rendered at the best pose found (or its PnP
  fallback) and flagged, never passed off as localized;
- a pose that lines up then competes with its turns by the scene's near-symmetries (``refine.symmetry``,
  :mod:`splatpose.refine.symmetry`): a refined turned copy that explains the image better replaces it;
- a PnP pose that lines up may still have been refined into a wrong basin (PnP on a near-symmetric part of
  one colour often starts tens of degrees off: its inliers are the outline's). Two signs get it a second
  opinion (``refine.second_opinion``): a colour difference far above the class's usual one (the median over
  the run's settled queries; the recovery searches again with the pose as one of its starts), or fewer PnP
  inliers than ``min_inliers`` (the recovery searches as if PnP had failed). The recovery's result is
  checked against the turns like any pose, and it replaces the pose when its colour difference is lower;
- last, a pose that lines up on a part with a near-symmetry has its turn about the axis searched
  (``refine.symmetry.polish_span_deg``, :class:`~splatpose.refine.symmetry.TurnPolish`): refinement
  settles such a turn slowly, so it may stop a degree or two off.

Every step compares renders on white with the query, whose non-white pixels are taken for the object.
A query photographed on a bench (``refine.bench.enabled``) is first put on white: at its PnP pose the
render's dilated silhouette says where the part may be, and there the pixels that look like the bench
around it (:func:`~splatpose.scoring.object_region.background_likeness`) become white too; a query PnP
failed on has no pose, so what looks like the bench along the image's border becomes white for the
recovery, and the pose it finds is then judged on the query put on white at that pose.

Writes ``refined_poses.json`` into the stage folder (one entry per query, in test order: the pose used
for rendering, its path, its alignment confidence and what refining and recovering did) and reuses it
when complete; and, when a query needed the recovery, ``search_views.npz``, its search views
(the splats rendered around the reference cameras), which the detector loads with the run.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from splatpose.data.cameras import center_error, rotation_error_deg
from splatpose.data.mad_sim import ClassData, read_image
from splatpose.refine.pose_refinement import PoseRefiner, Refinement
from splatpose.refine.recovery import (Confidence, PoseRecovery, Recovery, SearchViews, alignment_confidence,
                                       orbit_views, render_search_views)
from splatpose.refine.symmetry import SymmetryCheck, TurnPolish, near_symmetries
from splatpose.scoring.object_region import background_likeness, bench_whitened_by_border, silhouette_region
from splatpose.sfm.config import default_conf_dir
from splatpose.sfm.localization import QueryPose
from splatpose.splat.gaussians import Gaussians
from splatpose.splat.ply import load_gaussians
from splatpose.splat.rendering import render
from splatpose.atomic_files import atomic_path, write_json_atomic

log = logging.getLogger(__name__)

REFINED_POSES_FILE = "refined_poses.json"
SEARCH_VIEWS_FILE = "search_views.npz"
POSE_PATHS = ("pnp", "recovered", "failed")


def default_refine_config() -> DictConfig:
    """conf/refine/lbfgs.yaml: the refinement the pipeline runs by default."""
    return OmegaConf.load(default_conf_dir() / "refine" / "lbfgs.yaml")


@dataclass
class RefinedPose:
    """The pose a query is rendered at.

    w2c: [4, 4] float64 world-to-camera (OpenCV): refined, recovered, or the PnP pose (refinement off).
    path: how it was found: "pnp" (PnP, refined when refinement is on; see :attr:`lines_up`), "recovered"
        (through the splats after PnP failed or did not line up), "failed" (nothing lined up: w2c is a best
        effort).
    refinement: what refining the PnP pose did (steps, losses, pose change, seconds); None when not refined.
    confidence: alignment of the render with the query ({"iou", "l1"}); None when not measured.
    recovery: what the recovery did (hypotheses, start view, seconds, accepted); None when it did not run.
    symmetry: what the check against near-symmetric turns did (switched, turn, confidences, seconds, the
        replaced pose); None when it did not run (no near-symmetry, check off, or the pose did not line up).
    second_opinion: what the second opinion did (the class's usual colour difference, the pose's, the
        recovery's summary, replaced, the replaced pose, seconds); None when none was asked for.
    turn_polish: what the search of the turn about the part's axis did (turn_deg, losses, renders,
        seconds); None when it did not run (no near-symmetry, polish off, or the pose did not line up).
    """

    name: str
    w2c: np.ndarray
    refinement: dict | None = None
    path: str = "pnp"
    confidence: dict | None = None
    recovery: dict | None = None
    symmetry: dict | None = None
    second_opinion: dict | None = None
    turn_polish: dict | None = None

    @property
    def refined(self) -> bool:
        return self.refinement is not None

    @property
    def localized(self) -> bool:
        return self.path != "failed"

    @property
    def lines_up(self) -> bool:
        """Whether the pose passed the alignment check when it was settled. When a refined PnP pose did not and the
        recovery found nothing that does, one of the two is kept (``refine.recovery.when_neither_lines_up``, see
        :meth:`PoseSettler._kept_when_neither_lines_up`) with the recovery's record; it is localized, but its map
        is doubtful."""
        if self.path == "recovered":
            return not (self.recovery or {}).get("kept_for_its_silhouette", False)
        searched_in_vain = self.recovery is not None and not self.recovery["accepted"]
        return self.path == "pnp" and not searched_in_vain

    def to_json(self) -> dict:
        return {"name": self.name, "w2c": np.asarray(self.w2c).tolist(), "path": self.path,
                "refinement": self.refinement, "confidence": self.confidence, "recovery": self.recovery,
                "symmetry": self.symmetry, "second_opinion": self.second_opinion, "turn_polish": self.turn_polish}


class PoseSettler:
    """The final pose of a query image from its localization result (see the module docstring).

    Args:
        gaussians: the scene; K: [3, 3] intrinsics of the full image; width, height: its size.
        cfg: the ``refine`` node (with its ``recovery`` node).
        db_w2c: [N, 4, 4] the reference cameras the recovery's search views orbit.
        search_views_file: where the search views are kept: loaded from there when it exists, else
            rendered when the first query needs the recovery and written there (None: not written).
        backend, scorer: as for :class:`PoseRefiner`.
    """

    def __init__(self, gaussians: Gaussians, K: np.ndarray, width: int, height: int, cfg: DictConfig,
                 db_w2c: np.ndarray, search_views_file: Path | None = None, backend: str = "auto", scorer=None):
        self.gaussians, self.K, self.cfg, self.backend = gaussians, np.asarray(K, np.float64), cfg, backend
        self.width, self.height, self.db_w2c, self.search_views_file = width, height, db_w2c, search_views_file
        self.refiner = PoseRefiner(gaussians, K, width, height, cfg, backend=backend, scorer=scorer)
        recovery_cfg = cfg.get("recovery")
        self.recovery_enabled = recovery_cfg is not None and bool(recovery_cfg.enabled)
        self._recovery: PoseRecovery | None = None
        symmetry_cfg = cfg.get("symmetry")
        self.symmetry_enabled = symmetry_cfg is not None and bool(symmetry_cfg.enabled)
        self._symmetry: SymmetryCheck | None = None
        self._turn_polish: TurnPolish | None = None
        # The class's usual colour difference at a settled pose (:func:`typical_colour_difference`); set by
        # the caller once known (the refine stage after its first pass, the detector from the run). None:
        # no second opinions.
        self.typical_l1: float | None = None

    @property
    def recovery(self) -> PoseRecovery | None:
        """The recovery, its search views made on first use (most runs of textured objects never need them)."""
        if self.recovery_enabled and self._recovery is None:
            path = self.search_views_file
            if path is not None and Path(path).is_file():
                views = load_search_views(path)
            else:
                views = make_search_views(self.gaussians, self.K, self.width, self.height, self.db_w2c,
                                           self.cfg.recovery, self.backend)
                if path is not None:
                    save_search_views(Path(path), views)
            self._recovery = PoseRecovery(self.gaussians, self.K, self.width, self.height, views,
                                          self.cfg.recovery, backend=self.backend,
                                          gradients=self.cfg.get("gradients", "auto"),
                                          max_size=self.cfg.get("max_size"),
                                          enclosed_white=self.refiner.enclosed_white)
        return self._recovery

    @property
    def symmetry(self) -> SymmetryCheck | None:
        """The near-symmetry check, the scene's near-symmetries found on first use (None: check off)."""
        if self.symmetry_enabled and self._symmetry is None:
            self._symmetry = SymmetryCheck(self.refiner, near_symmetries(self.gaussians, self.cfg.symmetry),
                                           self.cfg.symmetry, self.K, self.backend)
        return self._symmetry

    @property
    def turn_polish(self) -> TurnPolish | None:
        """The search of a settled pose's turn about the part's axis (None: off, or no near-symmetry)."""
        if self._turn_polish is None and self.symmetry_enabled:  # (the check finds the near-symmetries once)
            self._turn_polish = TurnPolish.configured(self.refiner, self.symmetry.symmetries, self.cfg)
        return self._turn_polish

    def settle(self, query: torch.Tensor, pose: QueryPose) -> RefinedPose:
        """``query`` [3, H, W] in [0, 1]; ``pose`` its localization result."""
        prepared = self._prepared(query, pose)
        settled, confidence, prepared = self._settle(query, prepared, pose)
        if self._off_the_bench_by_border(pose) and not settled.localized and (settled.recovery or {}).get("hypotheses"):
            prepared, confidence = self._judged_off_the_bench(query, settled)
        settled = self._against_turns(prepared, settled, confidence)
        reason = self.second_opinion_reason(settled, pose)
        if reason is not None:
            settled = self._second_opinion(prepared, settled, reason)
        return self._polished(prepared, settled)

    def reconsider(self, query: torch.Tensor, pose: QueryPose, settled: RefinedPose) -> RefinedPose:
        """``settled`` (what :meth:`settle` gave for ``query`` and ``pose`` before ``typical_l1`` was known),
        after a second opinion when it needs one (a pose it put in place is polished as :meth:`settle` does)."""
        reason = self.second_opinion_reason(settled, pose)
        if reason is None:
            return settled
        prepared = self._prepared(query, pose, settled.w2c)
        result = self._second_opinion(prepared, settled, reason)
        return self._polished(prepared, result) if result.second_opinion["replaced"] else result

    def second_opinion_reason(self, settled: RefinedPose, pose: QueryPose) -> str | None:
        """Why a pose that lined up, not asked before, gets a second opinion. A PnP pose (the recovery has not
        searched for it yet): ``"weak_pnp"`` when it rests on fewer than ``min_inliers`` PnP inliers (``pose``:
        its localization result), ``"colour"`` when its colour difference is over ``l1_ratio`` times the class's
        usual one. A recovered pose: ``"recovered_colour"`` when its colour difference is over that and
        ``recovered_hypotheses`` is set (its search refined too few coarse poses to reach the right basin).
        None: no second opinion."""
        cfg = self.cfg.get("second_opinion")
        if not (cfg is not None and bool(cfg.enabled) and self.recovery_enabled and settled.lines_up
                and settled.confidence is not None and settled.second_opinion is None):
            return None
        doubtful_colour = (self.typical_l1 is not None
                           and settled.confidence["l1"] > float(cfg.l1_ratio) * self.typical_l1)
        if settled.path == "recovered":
            return "recovered_colour" if doubtful_colour and cfg.get("recovered_hypotheses") is not None else None
        if cfg.get("min_inliers") is not None and pose.num_inliers < int(cfg.min_inliers):
            return "weak_pnp"
        return "colour" if doubtful_colour else None

    def _prepared(self, query: torch.Tensor, pose: QueryPose, w2c: np.ndarray | None = None) -> torch.Tensor:
        """The query as every step compares it: put on white first when it was taken on a bench (at ``w2c``,
        by default PnP's pose)."""
        bench = self.cfg.get("bench")
        if bench is not None and bench.enabled and pose.success:
            return self.off_the_bench(query, pose.w2c if w2c is None else w2c, int(bench.dilation_px), float(bench.tau))
        if self._off_the_bench_by_border(pose):
            return bench_whitened_by_border(query, float(bench.border_tau))
        return query

    def _off_the_bench_by_border(self, pose: QueryPose) -> bool:
        """Whether ``pose``'s query is put on white by the bench along its border (taken on a bench, no PnP
        pose; ``border_tau`` is absent in runs made before it: such queries are left as they are)."""
        bench = self.cfg.get("bench")
        return (bench is not None and bool(bench.enabled) and not pose.success
                and bench.get("border_tau") is not None)

    def _judged_off_the_bench(self, query: torch.Tensor, settled: RefinedPose) -> tuple[torch.Tensor, Confidence]:
        """A pose the recovery found for a query PnP failed on was searched and judged on the query put on
        white by its border (a halo round the part, clutter unlike the bench). Judge it again as a PnP pose
        is judged: on ``query`` put on white at that pose. ``settled`` takes that alignment (and the path
        "recovered" when it passes); returns the query so put on white and the alignment."""
        bench = self.cfg.bench
        prepared = self.off_the_bench(query, settled.w2c, int(bench.dilation_px), float(bench.tau))
        confidence = self._confidence(settled.w2c, prepared)
        settled.confidence = confidence.summary()
        settled.recovery = {**settled.recovery, "judged_off_the_bench_at_its_pose": True}
        if self._accepted(confidence):
            settled.path = "recovered"
        return prepared, confidence

    def _against_turns(self, query: torch.Tensor, settled: RefinedPose, confidence: Confidence | None) -> RefinedPose:
        """``settled``, replaced by a turned copy by the near-symmetry check when one explains ``query`` better."""
        if not settled.localized or self.symmetry is None or not self.symmetry.symmetries:
            return settled
        verdict = self.symmetry.check(query, settled.w2c, confidence)
        settled.symmetry = verdict.summary()
        if verdict.switched:
            settled.w2c = verdict.w2c
            if settled.confidence is not None:
                settled.confidence = verdict.confidence.summary()
        return settled

    def _polished(self, query: torch.Tensor, settled: RefinedPose) -> RefinedPose:
        """``settled`` with its turn about the part's axis searched (:attr:`turn_polish`), its alignment measured
        again when the pose turned; as it is when the pose did not line up or there is nothing to search."""
        if not settled.localized or self.turn_polish is None:
            return settled
        w2c, settled.turn_polish = self.turn_polish.polish(query, settled.w2c)
        if settled.turn_polish["turn_deg"]:
            settled.w2c = w2c
            if settled.confidence is not None:
                settled.confidence = self._confidence(w2c, query).summary()
        return settled

    def _second_opinion(self, query: torch.Tensor, settled: RefinedPose, reason: str) -> RefinedPose:
        """The recovery's pose, checked against the turns, when its colour difference is lower than ``settled``'s
        by the ``margin`` (relative); else ``settled``, with the record. For a PnP pose asked about for its colour
        (``reason`` "colour") the recovery has the pose among its starts; for a weak PnP pose it searches as if
        PnP had failed (a refined start wins the recovery's levels on their loss, wrong basin or not); for a
        recovered pose ("recovered_colour") its first level refines ``recovered_hypotheses`` starts: the pose and
        the best coarse poses."""
        started = time.perf_counter()
        l1_before = float(settled.confidence["l1"])
        wider = self.cfg.second_opinion.get("recovered_hypotheses") if reason == "recovered_colour" else None
        recovered = self.recovery.recover(query, start_w2c=None if reason == "weak_pnp" else settled.w2c,
                                          first_hypotheses=wider)
        result = settled
        if recovered.accepted:
            candidate = RefinedPose(settled.name, recovered.w2c, settled.refinement, "recovered",
                                    recovered.confidence.summary(), recovered.summary())
            candidate = self._against_turns(query, candidate, recovered.confidence)
            if candidate.confidence["l1"] < l1_before * (1.0 - float(self.cfg.second_opinion.margin)):
                result = candidate
        typical = None if self.typical_l1 is None else round(self.typical_l1, 6)
        result.second_opinion = {"reason": reason, "typical_l1": typical, "l1_before": round(l1_before, 6),
                                 "recovery": recovered.summary(), "replaced": result is not settled,
                                 "seconds": round(time.perf_counter() - started, 4)}
        if result is not settled:
            result.second_opinion["replaced_w2c"] = np.asarray(settled.w2c).tolist()
        return result

    def off_the_bench(self, query: torch.Tensor, w2c: np.ndarray, dilation_px: int, tau: float) -> torch.Tensor:
        """``query`` [3, H, W] with white wherever it shows the bench, not the part: outside the render's
        silhouette at ``w2c`` dilated by ``dilation_px``, and in the band between the two where a pixel
        looks like the bench around it (likeness above 1/2 at ``tau``). Inside the silhouette nothing is
        whitened: the part's own colours may be the bench's too."""
        device = self.gaussians.means.device
        with torch.no_grad():
            _, alpha = render(self.gaussians, torch.as_tensor(w2c, dtype=torch.float32, device=device),
                              torch.as_tensor(self.K, dtype=torch.float32, device=device), self.width, self.height,
                              backend=self.backend, return_alpha=True)
        image = query[None].to(alpha.device, torch.float32)
        alpha = alpha.permute(0, 3, 1, 2)
        region = silhouette_region(alpha, 0.5, dilation_px)
        bench = background_likeness(image, region, tau, compared=alpha < 0.5) >= 0.5
        part = (alpha >= 0.5) | ((region > 0) & ~bench)
        return torch.where(part, image, torch.ones_like(image))[0].to(query.device, query.dtype)

    def _settle(self, original: torch.Tensor, query: torch.Tensor, pose: QueryPose
                ) -> tuple[RefinedPose, Confidence | None, torch.Tensor]:
        """The pose by PnP, refinement and recovery, its alignment (None when not measured) and the query as
        compared (``query``: ``original`` as :meth:`_prepared` gave it; on a bench, put on white again at
        the refined pose)."""
        if pose.success:
            refinement, query = self._refined(original, query, pose)
            if not self.recovery_enabled:
                return RefinedPose(pose.name, refinement.w2c, refinement.summary()), None, query
            confidence = self._confidence(refinement.w2c, query)
            if self._accepted(confidence):
                return RefinedPose(pose.name, refinement.w2c, refinement.summary(), "pnp",
                                   confidence.summary()), confidence, query
            recovered = self.recovery.recover(query, start_w2c=refinement.w2c)
            if recovered.accepted:
                return (RefinedPose(pose.name, recovered.w2c, refinement.summary(), "recovered",
                                    recovered.confidence.summary(), recovered.summary()), recovered.confidence, query)
            return (*self._kept_when_neither_lines_up(pose.name, refinement, confidence, recovered), query)
        if not self.recovery_enabled:
            return RefinedPose(pose.name, pose.w2c, path="failed"), None, query
        recovered = self.recovery.recover(query)
        path = "recovered" if recovered.accepted else "failed"
        w2c = recovered.w2c if recovered.hypotheses else pose.w2c
        return (RefinedPose(pose.name, w2c, None, path, recovered.confidence.summary(), recovered.summary()),
                recovered.confidence, query)

    def _refined(self, original: torch.Tensor, query: torch.Tensor, pose: QueryPose) -> tuple[Refinement, torch.Tensor]:
        """PnP's pose refined against ``query``, and the query as last compared.

        On a bench (``refine.bench``) the query was put on white at the PnP pose, and what that kept holds
        the refinement near it: inside the render's silhouette nothing is whitened, so the bench where the
        part is not, at a pose a few degrees off, stays as if it were part. So the query is put on white
        again at the refined pose and the pose refined again at the finest level, for up to ``rounds`` in
        all, until a round turns it by less than ``settle_deg``; the last query put on white is at the
        final pose."""
        refinement = self.refiner.refine(query, pose.w2c)
        bench = self.cfg.get("bench")
        if bench is None or not bench.enabled or int(bench.get("rounds") or 1) <= 1:
            return refinement, query
        finest = [len(self.refiner.levels) - 1]
        query = self.off_the_bench(original, refinement.w2c, int(bench.dilation_px), float(bench.tau))
        for rounds in range(2, int(bench.rounds) + 1):
            again = self.refiner.refine(query, refinement.w2c, levels=finest)
            refinement = Refinement(again.w2c, refinement.steps + again.steps, refinement.loss_start, again.loss_end,
                                    rotation_error_deg(pose.w2c, again.w2c), center_error(pose.w2c, again.w2c),
                                    refinement.seconds + again.seconds, rounds)
            query = self.off_the_bench(original, refinement.w2c, int(bench.dilation_px), float(bench.tau))
            if again.rotation_change_deg < float(bench.settle_deg):
                break
        return refinement, query

    def _kept_when_neither_lines_up(self, name: str, refinement: Refinement, confidence: Confidence,
                                    recovered: Recovery) -> tuple[RefinedPose, Confidence]:
        """The pose kept (not lining up, :attr:`RefinedPose.lines_up`) when neither the refined PnP pose
        (``refinement``, its alignment ``confidence``) nor the recovery's (``recovered``) passed the alignment check,
        and that pose's alignment. ``when_neither_lines_up: pnp`` keeps PnP's: its inliers are evidence the
        recovery does not have, and a large defect changes the outline. ``silhouette`` keeps the recovery's when
        its silhouette passes (IoU >= ``min_iou``) and PnP's does not: then only its colours failed, and a
        stain or a missing piece raises the colour difference of the right pose too (path "recovered")."""
        min_iou = float(self.cfg.recovery.min_iou)
        if (self.cfg.recovery.get("when_neither_lines_up", "pnp") == "silhouette"
                and recovered.confidence.iou >= min_iou > confidence.iou):
            kept = {**recovered.summary(), "kept_for_its_silhouette": True}
            return (RefinedPose(name, recovered.w2c, refinement.summary(), "recovered", recovered.confidence.summary(),
                                kept), recovered.confidence)
        return (RefinedPose(name, refinement.w2c, refinement.summary(), "pnp", confidence.summary(),
                            recovered.summary()), confidence)

    def _confidence(self, w2c: np.ndarray, query: torch.Tensor) -> Confidence:
        return alignment_confidence(self.gaussians, w2c, query, self.K, self.backend, self.refiner.enclosed_white)

    def _accepted(self, confidence: Confidence) -> bool:
        return confidence.accepted(float(self.cfg.recovery.min_iou), float(self.cfg.recovery.max_l1))


def refine_query_poses(data: ClassData, poses: list[QueryPose], cfg: DictConfig, gaussians_ply: Path,
                       out_dir: Path | None, device: str, backend: str = "auto", scorer=None) -> list[RefinedPose]:
    """The final pose of every query (``cfg``: the ``refine`` node); ``out_dir`` None: no cache files."""
    if not cfg.enabled:
        return [RefinedPose(p.name, p.w2c, path="pnp" if p.success else "failed") for p in poses]
    cache_file = Path(out_dir) / REFINED_POSES_FILE if out_dir is not None else None
    cached = load_refined_poses(cache_file, [p.name for p in poses])
    if cached is not None:
        log.info("refinement: reusing %s", cache_file)
        return cached
    search_views_file = Path(out_dir) / SEARCH_VIEWS_FILE if out_dir is not None else None
    settler = PoseSettler(load_gaussians(gaussians_ply, device), data.K, data.width, data.height, cfg,
                          data.train_w2c, search_views_file, backend=backend, scorer=scorer)
    refined = []
    for test, pose in tqdm(list(zip(data.test, poses, strict=True)), desc="refine poses", leave=False):
        query = torch.from_numpy(read_image(test.path)).permute(2, 0, 1)
        refined.append(settler.settle(query, pose))
    settler.typical_l1 = typical_colour_difference(refined)
    doubtful = [i for i, settled in enumerate(refined) if settler.second_opinion_reason(settled, poses[i])]
    for i in tqdm(doubtful, desc="second opinions", leave=False):
        query = torch.from_numpy(read_image(data.test[i].path)).permute(2, 0, 1)
        refined[i] = settler.reconsider(query, poses[i], refined[i])
    if doubtful:
        log.info("second opinions: %d of %d poses replaced (colour difference over %.2f x the class's %.4f)",
                 sum(refined[i].second_opinion["replaced"] for i in doubtful), len(doubtful),
                 float(cfg.second_opinion.l1_ratio), settler.typical_l1)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache_file, [r.to_json() for r in refined])
    counts = {path: sum(r.path == path for r in refined) for path in POSE_PATHS}
    log.info("final poses: %d by PnP, %d recovered through the splats, %d failed", counts["pnp"],
             counts["recovered"], counts["failed"])
    return refined


def typical_colour_difference(poses: list[RefinedPose], min_poses: int = 5) -> float | None:
    """The class's usual colour difference at a settled pose: the median alignment ``l1`` (mean absolute
    colour difference over the silhouettes, :func:`~splatpose.refine.recovery.alignment_confidence`) of the
    localized ``poses`` that have one; None when fewer than ``min_poses`` do (too few to call it usual)."""
    values = [p.confidence["l1"] for p in poses if p.localized and p.confidence is not None]
    return float(np.median(values)) if len(values) >= min_poses else None


def make_search_views(gaussians: Gaussians, K: np.ndarray, width: int, height: int, db_w2c: np.ndarray,
                 cfg: DictConfig, backend: str = "auto") -> SearchViews:
    """The recovery's search views (``cfg``: the ``refine.recovery`` node): the splats rendered at the
    reference cameras [N, 4, 4] and their orbits about the object (the Gaussians' median position)."""
    centre = gaussians.means.detach().double().median(dim=0).values.cpu().numpy()
    cameras = orbit_views(db_w2c, centre, [float(a) for a in cfg.orbit_deg])
    views = render_search_views(gaussians, K, width, height, cameras, int(cfg.search_size), backend=backend)
    # stored as float16 (save_search_views): round now, so a detector loading them searches the same images
    views.images, views.masks = views.images.half().float(), views.masks.half().float()
    return views


def save_search_views(path: Path, views: SearchViews) -> None:
    """Write the recovery's search images (float16) atomically."""
    with atomic_path(path) as tmp:
        np.savez(tmp, w2c=views.w2c, images=views.images.half().numpy(),
                 masks=views.masks.half().numpy(), centroids=views.centroids.numpy(),
                 areas=views.areas.numpy(), size=np.array([views.width, views.height]))


def load_search_views(path: Path) -> SearchViews:
    """Read what :func:`save_search_views` wrote."""
    with np.load(path) as npz:
        width, height = (int(v) for v in npz["size"])
        return SearchViews(npz["w2c"], torch.from_numpy(npz["images"]).float(),
                                    torch.from_numpy(npz["masks"]).float(), torch.from_numpy(npz["centroids"]),
                                    torch.from_numpy(npz["areas"]), width, height)


def load_refined_poses(path: Path | None, names: list[str]) -> list[RefinedPose] | None:
    """What :func:`refine_query_poses` wrote to ``path`` for the queries ``names`` (None: absent, or another set)."""
    if path is None or not path.exists():
        return None
    entries = json.loads(path.read_text())
    if [e["name"] for e in entries] != names:
        log.warning("%s does not match the test images; refining again", path)
        return None
    return [RefinedPose(e["name"], np.asarray(e["w2c"], dtype=np.float64), e["refinement"], e.get("path", "pnp"),
                        e.get("confidence"), e.get("recovery"), e.get("symmetry"), e.get("second_opinion"),
                        e.get("turn_polish"))
            for e in entries]
