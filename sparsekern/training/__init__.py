"""The parts of the one training loop; import the public names from :mod:`sparsekern.train`.

=================  ===================================================================================
module             job
=================  ===================================================================================
``config``         :class:`TrainConfig`, :class:`Stage`, lr schedules, Scratch-B budgets
``hooks``          the hook protocol: :class:`Hook`, :class:`TrainState`, :class:`TrainResult`
``losses``         cross-entropy, distillation loss, logits and accuracy counts
``adversary``      PGD and the buffer guard of attacks
``data``           seeded sharding samplers, loaders, batches, step counts
``evaluate``       loss / accuracy (/ robust accuracy) in eval mode
``params``         what each stage trains (param groups) and the freezing of the rest
``optim``          per-stage optimizers, schedules and data (:class:`StageRun`)
``distributed``    process group, DDP wrapper, gradient averaging
``checkpoint``     what a checkpoint holds and how a run resumes from it
``objective``      default objective, hooks' terms, one backward per distinct objective
``step``           one stage of one step: attack, forward, teacher, loss, backward, update
``trainer``        setup, epochs, steps, evaluation, checkpoints
=================  ===================================================================================
"""
