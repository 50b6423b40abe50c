r"""VNN-COMP verification core (issue #8): answer sat / unsat for one instance.

An instance is an ONNX network f and a VNN-LIB property: an input set (a union of boxes) and an
unsafe output set (a union of disjuncts ``C y <= d``).  ``sat`` means some input of the set maps
into the unsafe set (a witness re-checked with onnxruntime on the original file); ``unsat`` means
sound bounds prove that none does.

API (the front ends -- instances.csv, result files, the CLI, the runner -- call only this)::

    from rj_plugin.verify import VerifyOptions, Verdict, verify_instance
    verdict = verify_instance("net.onnx", "prop.vnnlib", timeout_s=116,
                              options=VerifyOptions(bab_batch=256), deadline=None)
    verdict.answer    # "sat" | "unsat" | "unknown" | "timeout" | "error"
    verdict.witness   # (x flat C order, y flat), float64, as re-checked on onnxruntime (sat)
    verdict.stage, verdict.seconds, verdict.details   # deciding stage, wall time, JSON details

Modules, one job each:

* :mod:`~rj_plugin.verify.witness`   onnxruntime on the original ONNX; witness re-check at
  tolerance 0 in float64.
* :mod:`~rj_plugin.verify.network`   the instance's float64 torch model, with a validated
  batch-preserving rewrite of batch-1 ``Flatten`` graphs (batched auto_LiRPA calls).
* :mod:`~rj_plugin.verify.falsify`   stage 1: random points, vertices, PGD on the violation.
* :mod:`~rj_plugin.verify.prove`     stages 2-3: LiRPA bounds of the spec rows; the Jacobian
  mean-value bound and monotone collapse.
* :mod:`~rj_plugin.verify.bab`       stage 4: batched input-space branch and bound.
* :mod:`~rj_plugin.verify.pipeline`  ``VerifyOptions``, ``Verdict``, ``verify_instance``.

The other modules of this folder (instances, results, score, runner) are the front ends.
"""

from rj_plugin.verify.pipeline import ANSWERS, Verdict, VerifyOptions, verify_instance

__all__ = ["ANSWERS", "Verdict", "VerifyOptions", "verify_instance"]
