"""Model cards and Hub uploads (`huggingface_hub`): `hf_useg.hub.cards` and `hf_useg.hub.push`.

* [`generate_model_card`] builds the card of a trained, fitted or converted model: `ModelCardData` metadata
  (``pipeline_tag: image-segmentation``, ``library_name: hf_useg``, base model, datasets, a ``model-index`` with
  the cluster- and linear-probe accuracy and mIoU) and a body with the results, the evaluation protocol and usage.
* [`model_card_from_folder`] does the same for a saved model folder (``config.json``, ``training_summary.json``,
  ``eval_results.json``), [`validate_model_card`] checks a card offline, [`card_eval_results`] reads the numbers
  back.
* [`push_model_folder`] uploads a model folder (weights, config, image processor, card) in one commit and
  [`push_space_folder`] uploads the Gradio Space (``spaces/``, with the `hf_useg` source so that it runs without
  a released package). ``hf-useg push`` is their command line.

Example:

```python
>>> from hf_useg.hub import model_card_from_folder, push_model_folder, validate_model_card
>>> card = model_card_from_folder("outputs/stego/model", repo_id="me/stego-camvid")     # doctest: +SKIP
>>> validate_model_card(card).pipeline_tag                                              # doctest: +SKIP
'image-segmentation'
>>> push_model_folder("outputs/stego/model", "me/stego-camvid", private=True)            # doctest: +SKIP
```
"""

from .cards import card_eval_results, generate_model_card, model_card_from_folder, validate_model_card
from .push import push_model_folder, push_space_folder

__all__ = [
    "card_eval_results",
    "generate_model_card",
    "model_card_from_folder",
    "push_model_folder",
    "push_space_folder",
    "validate_model_card",
]
