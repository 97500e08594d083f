"""Test-time adaptation: fine-tune what ``adapt.params`` declares on each episode's own supports, then predict.

``pseudo`` makes pseudo-episodes from the supports alone, ``targets`` prepares the working copy and
says what trains for each declared choice, ``adapter`` runs one episode (reset, adapt, predict), and
``score`` scores fixed episodes with it and chooses steps and lr on base-class validation episodes.
"""
from svfseg.engine.adapt.adapter import EpisodeAdapter
from svfseg.engine.adapt.score import AdaptChoice, adapted_evaluation, choose_adaptation, validation_episodes

__all__ = ["AdaptChoice", "EpisodeAdapter", "adapted_evaluation", "choose_adaptation", "validation_episodes"]
