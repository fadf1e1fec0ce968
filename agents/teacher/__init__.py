"""Teachers: what knows the ground truth and shows the way from a wrong box to the right one.

- :mod:`agents.teacher.geometric`: box interpolation and the offline geometric reasoning text of each step.
- :mod:`agents.teacher.planned`: :class:`PlannedTeacher`, a policy that replays a planned trajectory.
- :mod:`agents.teacher.starts`: stand-in start boxes (a scripted student, the perturbed-GT ablation).

The scripted :class:`agents.policies.scripted.InterpolatingTeacher` and the teacher VLM
(:mod:`agents.synthesis.vlm_reasoner`) build on these.
"""
