"""`engine.errors.one_line`: the line a user sees for an error, from real Ray errors of real actors."""

from __future__ import annotations

import os

import pytest

from engine import errors


class LearnerActor:
    """Named like the learner's actor class, so the role is found the way it is for the real one."""

    def exit_now(self) -> None:
        os._exit(3)

    def fail(self) -> None:
        raise ValueError("micro_batch_size 3 does not divide 8\nsecond line of detail")


@pytest.mark.ray
def test_an_actor_that_died_is_named_with_its_role_the_step_and_the_cause(ray_local) -> None:
    ray = ray_local
    actor = ray.remote(LearnerActor).options(num_cpus=0).remote()
    errors.step_started(7)
    try:
        with pytest.raises(ray.exceptions.RayActorError) as died:
            ray.get(actor.exit_now.remote())
        line = errors.one_line(died.value)
    finally:
        errors.step_finished()
    assert line.startswith("the learner process died during step 7: "), line
    assert "\n" not in line and len(line) < 400, line


@pytest.mark.ray
def test_a_remote_exception_is_its_cause_on_one_line(ray_local) -> None:
    ray = ray_local
    actor = ray.remote(LearnerActor).options(num_cpus=0).remote()
    with pytest.raises(ray.exceptions.RayTaskError) as failed:
        ray.get(actor.fail.remote())
    line = errors.one_line(failed.value)
    assert line == "learner failed: ValueError: micro_batch_size 3 does not divide 8", line
    ray.kill(actor)


def test_our_own_errors_keep_their_message_and_others_their_type() -> None:
    from engine.tasks.files import TaskFileError

    assert errors.one_line(TaskFileError("data.jsonl:3: field 'prompt' is missing")) == \
        "data.jsonl:3: field 'prompt' is missing"
    assert errors.one_line(KeyError("x")) == "KeyError: 'x'"
    assert errors.one_line(RuntimeError("")) == "RuntimeError"
