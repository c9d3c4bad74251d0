"""Training data: the synthetic grounded-VQA set (``synthetic``), the Saliency-R1-format loader
(``loader``), and the sets a run's configuration names (``sets``)."""
