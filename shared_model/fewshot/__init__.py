"""Few-shot new tasks (GMISeg-style): a support set of K labelled images defines a task the base model
was never trained on, learned either by a small task adapter (:mod:`~shared_model.fewshot.adapter`,
:mod:`~shared_model.fewshot.adapt`) or in context with no gradient (:mod:`~shared_model.fewshot.incontext`)."""
