"""Model cards (`hf_useg.hub`) and Hub uploads.

Uploads are tested for real against a local stand-in for the Hub: `FakeHub` below is a small HTTP server that
implements the endpoints `huggingface_hub` calls for ``create_repo`` + ``create_commit`` (repo creation, README
metadata validation, preupload, the LFS batch API with basic PUT transfers and verify, and the ndjson commit).
The real `huggingface_hub` client talks to it over HTTP; the test then compares what the server stored, byte for
byte, with the local folder. What it does not cover: the real Hub's server-side rules (its YAML validator is
replaced by `huggingface_hub.ModelCard` parsing) and Xet storage (disabled here, so LFS files take the legacy
LFS path).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from tiny_configs import tiny_vit_config
from transformers import ViTConfig

from hf_useg import DinoForUnsupervisedSegmentation, DinoSegmentationConfig, StegoConfig
from hf_useg.hub import (
    card_eval_results,
    generate_model_card,
    model_card_from_folder,
    push_model_folder,
    push_space_folder,
    validate_model_card,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO_ROOT / "training" / "configs" / "stego_tiny.yaml"
TOKEN = "hf_test_token"


@pytest.fixture(scope="module")
def trained_model_dir(tmp_path_factory) -> Path:
    """A tiny STEGO model trained on the generated scenes, saved with its card and eval_results.json."""
    from hf_useg.training import load_training_arguments, train

    output_dir = tmp_path_factory.mktemp("stego-tiny")
    args = load_training_arguments(
        TINY_CONFIG, output_dir=str(output_dir), max_steps=2, val_every=100, save_every=100, synthetic_num_images=8
    )
    return Path(train(args)["model_dir"])


def _tiny_backbone() -> ViTConfig:
    return tiny_vit_config(layer_norm_eps=1e-12)


def _percent_table(eval_results: dict) -> dict:
    return {
        probe: {metric: round(100 * values[metric], 2) for metric in ("accuracy", "mean_iou")}
        for probe, values in eval_results.items()
    }


# ----------------------------------------------------------------------------------------------------------------
# cards


def test_trained_model_card_carries_its_eval_results(trained_model_dir):
    eval_results = json.loads((trained_model_dir / "eval_results.json").read_text())
    assert set(eval_results) == {"cluster", "linear"}
    expected = _percent_table(eval_results)
    # the card training wrote, and the one regenerated from the folder for a repository
    written = trained_model_dir / "README.md"
    regenerated = model_card_from_folder(trained_model_dir, repo_id="tester/stego-tiny")
    for card in (written, regenerated):
        data = validate_model_card(card)
        assert card_eval_results(card) == expected
        assert data.pipeline_tag == "image-segmentation"
        assert data.library_name == "hf_useg"
        assert data.base_model is None  # a randomly initialised backbone is no base model
        assert data.datasets is None  # generated data is not a Hub dataset
        assert {r.dataset_type for r in data.eval_results} == {"synthetic-scenes"}
        assert {r.dataset_split for r in data.eval_results} == {"generated val"}
    assert regenerated.data.model_name == "stego-tiny"
    text = str(regenerated)
    # the tables repeat the same numbers, and the protocol is spelled out
    for probe, title in (("cluster", "cluster probe (unsupervised)"), ("linear", "linear probe (supervised)")):
        row = f"| {title} | {expected[probe]['accuracy']:.2f} | {expected[probe]['mean_iou']:.2f} |"
        assert row in text
    for row in (
        "| resolution (shorter side, px) | 32 |",
        "| crop | center |",
        "| horizontal-flip TTA | yes |",
        "| dense CRF | no |",
        "| cluster-to-class matching | hungarian |",
        "| mixed precision | no |",
    ):
        assert row in text
    assert 'pipeline("image-segmentation", model="tester/stego-tiny")' in text
    assert 'StegoForUnsupervisedSegmentation.from_pretrained("tester/stego-tiny")' in text


def test_card_metadata_round_trips_through_huggingface_hub():
    config = StegoConfig(backbone_config=_tiny_backbone(), dim=8, num_classes=2, extra_clusters=1)
    results = {
        "cluster": {"accuracy": 0.123456, "mean_iou": 0.5},
        "linear": {"accuracy": 1.0, "mean_iou": 0.0},
        "cluster_crf": {"accuracy": 0.33335, "mean_iou": 0.254999},
        "not_a_probe": {"accuracy": 0.9, "mean_iou": 0.9},  # ignored
    }
    summary = {
        "backbone": "facebook/dino-vits8",
        "dataset": "tester/street-scenes",
        "steps": 7000,
        "eval_protocol": {"resolution": 320, "crop": "center", "flip_tta": True, "crf": True, "split": "val"},
    }
    card = generate_model_card(config, summary=summary, results=results, repo_id="tester/stego-streets")
    yaml_block = yaml.safe_load(str(card).split("---")[1])
    name, parsed = model_index_to_eval_results(yaml_block["model-index"])
    assert name == "stego-streets"
    by_probe = {(r.metric_config, r.metric_type): r.metric_value for r in parsed}
    assert by_probe == {
        ("cluster", "accuracy"): 12.35,
        ("cluster", "mean_iou"): 50.0,
        ("linear", "accuracy"): 100.0,
        ("linear", "mean_iou"): 0.0,
        ("cluster_crf", "accuracy"): 33.34,  # round(33.335, 2) in binary floating point
        ("cluster_crf", "mean_iou"): 25.5,
    }
    assert {r.metric_args["matching"] for r in parsed if r.metric_config == "linear"} == {"none"}
    assert {r.metric_args["matching"] for r in parsed if r.metric_config == "cluster"} == {"hungarian"}
    assert ModelCard(str(card)).data.to_dict() == card.data.to_dict()
    data = validate_model_card(str(card))
    assert data.base_model == "facebook/dino-vits8"
    assert data.datasets == ["tester/street-scenes"]
    assert yaml_block["tags"] == ["unsupervised-semantic-segmentation", "semantic-segmentation", "stego", "hf_useg"]
    assert "[facebook/dino-vits8](https://huggingface.co/facebook/dino-vits8)" in str(card)
    assert "| Segments | 3: cluster_0, cluster_1, cluster_2 |" in str(card)


def test_card_of_local_data_names_no_machine_path(tmp_path):
    data_dir = tmp_path / "private" / "camvid11"
    data_dir.mkdir(parents=True)
    config = StegoConfig(backbone_config=_tiny_backbone(), dim=8, num_classes=2)
    card = generate_model_card(
        config,
        summary={"dataset": str(data_dir), "backbone": str(tmp_path)},
        results={"cluster": {"accuracy": 0.5, "mean_iou": 0.25}},
    )
    data = validate_model_card(card)
    assert data.datasets is None and data.base_model is None
    assert data.eval_results[0].dataset_type == "camvid11"
    assert "private" not in card.data.to_yaml()
    # an explicit Hub dataset id wins
    card = generate_model_card(config, summary={"dataset": str(data_dir)}, dataset_id="tester/camvid")
    assert validate_model_card(card).datasets == ["tester/camvid"]
    assert "private" not in str(card)
    # a plain dataset name (e.g. from a converted checkpoint) is neither a path nor a Hub id
    card = generate_model_card(
        config, summary={"dataset": "cocostuff27"}, results={"cluster": {"accuracy": 0.5, "mean_iou": 0.25}}
    )
    data = validate_model_card(card)
    assert data.datasets is None
    assert (data.eval_results[0].dataset_type, data.eval_results[0].dataset_name) == ("cocostuff27", "cocostuff27")


def test_unevaluated_fitted_model_gets_a_valid_card(tmp_path):
    model = DinoForUnsupervisedSegmentation(DinoSegmentationConfig(backbone_config=_tiny_backbone(), num_clusters=3))
    model.save_pretrained(tmp_path)
    card = model_card_from_folder(tmp_path)
    data = validate_model_card(card)
    assert data.eval_results is None and card_eval_results(card) == {}
    assert "This model has not been evaluated yet" in str(card)
    assert "DINO-feature k-means" in str(card)
    assert "DinoForUnsupervisedSegmentation.from_pretrained" in str(card)


def test_kmeans_card_names_its_backbone_and_has_a_sane_title():
    random_backbone = "random-vit-tiny (randomly initialised ViT)"
    config = DinoSegmentationConfig(backbone_config=_tiny_backbone(), num_clusters=3, backbone_name=random_backbone)
    results = {"cluster": {"accuracy": 0.5, "mean_iou": 0.25}}
    card = generate_model_card(config, summary={"backbone": random_backbone, "dataset": "synthetic"}, results=results)
    text = str(card)
    assert "DINO backbone" not in text and "dino_segmentation-segmentation" not in text
    assert f"cosine k-means over the frozen patch features of {random_backbone}." in text
    assert "\n# DINO-feature k-means on generated synthetic scenes (not real data)\n" in text
    assert validate_model_card(card).model_name == "dino-kmeans-synthetic-scenes"
    # a pretrained backbone is named (and linked) the same way; a repository names the model
    config.backbone_name = "facebook/dino-vits8"
    card = generate_model_card(config, results=results, repo_id="tester/km-coco")
    assert "the frozen patch features of facebook/dino-vits8." in str(card)
    assert "\n# DINO-feature k-means — km-coco\n" in str(card) and card.data.model_name == "km-coco"
    # nothing known about the data: the method's name alone
    card = generate_model_card(config)
    assert "\n# DINO-feature k-means\n" in str(card) and card.data.model_name == "dino-kmeans"
    stego_config = StegoConfig(backbone_config=_tiny_backbone(), dim=8, num_classes=2, backbone_name=None)
    stego = generate_model_card(stego_config, summary={"backbone": random_backbone})
    assert f"trained on the frozen features of {random_backbone} by distilling" in str(stego)


def test_card_embeds_the_confusion_figure_and_per_class_table(tmp_path):
    from hf_useg.evaluation import hungarian_assignment, scores_from_confusion
    from hf_useg.inference import write_evaluation_report
    from hf_useg.report import CONFUSION_FIGURE, write_confusion_figure

    model = DinoForUnsupervisedSegmentation(DinoSegmentationConfig(backbone_config=_tiny_backbone(), num_clusters=3))
    model.save_pretrained(tmp_path)
    confusion = [[0, 40, 0], [30, 10, 0], [0, 0, 0]]  # class 2 in neither labels nor predictions: IoU undefined
    results = {"cluster": scores_from_confusion(confusion, hungarian_assignment(confusion))}
    class_names = ["road", "sky", "car"]
    write_evaluation_report(results, tmp_path, class_names)
    card = model_card_from_folder(tmp_path)
    assert CONFUSION_FIGURE not in str(card)  # no figure saved: no link
    write_confusion_figure(results, class_names, tmp_path / CONFUSION_FIGURE)
    card = model_card_from_folder(tmp_path)
    validate_model_card(card)
    text = str(card)
    assert re.search(r"!\[Confusion matrix [^\]]*\]\(confusion_matrix\.png\)", text)
    assert "<summary>Per-class IoU</summary>" in text
    table = text.split("<summary>Per-class IoU</summary>", 1)[1].split("</details>", 1)[0]
    assert re.search(r"road +75\.0%", table) and re.search(r"sky +80\.0%", table) and re.search(r"car +-", table)
    # without a folder: the table from the results and the class names, the figure as given
    card = generate_model_card(model, results=results, class_names=class_names, confusion_figure="cm.png")
    assert "](cm.png)" in str(card) and re.search(r"road +75\.0%", str(card))


@pytest.mark.parametrize(
    "results, message",
    [
        ({"cluster": {"accuracy": 1.5, "mean_iou": 0.5}}, r"results\['cluster'\]\['accuracy'\] must be a fraction"),
        ({"cluster": {"accuracy": 0.5, "mean_iou": math.nan}}, r"\['mean_iou'\] must be a fraction"),
        ({"linear": {"accuracy": None, "mean_iou": 0.5}}, r"\['accuracy'\] must be a number"),
        ({"cluster": {"accuracy": 0.5}}, r"results\['cluster'\] must hold 'accuracy' and 'mean_iou'"),
    ],
)
def test_card_rejects_bad_results(results, message):
    config = StegoConfig(backbone_config=_tiny_backbone(), dim=8, num_classes=2)
    with pytest.raises(ValueError, match=message):
        generate_model_card(config, results=results)


def test_card_rejects_non_models():
    with pytest.raises(TypeError, match="expected a segmentation model or its config, got dict"):
        generate_model_card({"model_type": "stego"})


def _good_card_text() -> str:
    config = StegoConfig(backbone_config=_tiny_backbone(), dim=8, num_classes=2)
    return str(generate_model_card(config, results={"cluster": {"accuracy": 0.5, "mean_iou": 0.25}}))


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda t: t.replace("pipeline_tag: image-segmentation", "pipeline_tag: image-classification"),
            "pipeline_tag",
        ),
        (lambda t: t.replace("library_name: hf_useg\n", ""), "library_name is missing"),
        (lambda t: t.replace("license: apache-2.0\n", ""), "license is missing"),
        (lambda t: t.replace("value: 50.0", "value: fifty"), "non-numeric value 'fifty'"),
        (lambda t: t.replace("value: 50.0", "value: 150.0"), "150.0 is not a percentage"),
        (lambda t: t.replace("    dataset:\n", "    dataset_info:\n"), "model_index"),
        (lambda t: t.replace("license: apache-2.0", "license: apache-2.0\nbase_model: not a//hub id"), "not a Hub id"),
        (lambda t: t.replace("---\n", "", 1), "neither a model card"),
    ],
)
def test_validate_model_card_rejects_broken_cards(edit, message):
    text = _good_card_text()
    validate_model_card(text)
    broken = edit(text)
    assert broken != text
    with pytest.raises(ValueError, match=message):
        validate_model_card(broken)


# ----------------------------------------------------------------------------------------------------------------
# a local stand-in for the Hub


class FakeHub:
    """State of the stand-in Hub: repositories with their files and commits, LFS objects, and a request log."""

    def __init__(self):
        self.repos: dict[tuple[str, str], dict] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization header)
        self.validated: list[dict] = []
        self.lock = threading.Lock()
        self.url = ""

    def files(self, repo_type: str, repo_id: str) -> dict[str, bytes]:
        return self.repos[(repo_type, repo_id)]["files"]


_REPO_PATH = r"(?P<owner>[\w.\-]+)/(?P<name>[\w.\-]+)"


def _make_handler(hub: FakeHub):
    prefixes = {"model": "", "dataset": "datasets/", "space": "spaces/"}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep pytest output clean
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().strip().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _reply(self, status: int, payload=None, error_code: str | None = None) -> None:
            body = json.dumps(payload if payload is not None else {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if error_code:
                self.send_header("X-Error-Code", error_code)
                self.send_header("X-Error-Message", str((payload or {}).get("error", error_code)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _log(self) -> None:
            with hub.lock:
                hub.requests.append((self.command, self.path.split("?")[0], self.headers.get("Authorization")))

        def _authorized(self) -> bool:
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                self._reply(401, {"error": "Invalid credentials"}, "InvalidCredentials")
                return False
            return True

        def _repo(self, repo_type: str, match) -> dict | None:
            repo = hub.repos.get((repo_type, f"{match['owner']}/{match['name']}"))
            if repo is None:
                self._reply(404, {"error": "Repository not found"}, "RepoNotFound")
            return repo

        def do_GET(self):  # downloads and repo info are not part of an upload: nothing to find here
            self._log()
            self._reply(404, {"error": "Entry not found"}, "EntryNotFound")

        do_HEAD = do_GET

        def do_PUT(self):
            self._log()
            body = self._body()
            match = re.fullmatch(r"/lfs-upload/(?P<oid>[0-9a-f]{64})", self.path)
            if not match:
                return self._reply(404, {"error": "not found"})
            if hashlib.sha256(body).hexdigest() != match["oid"]:
                return self._reply(400, {"error": "sha256 mismatch"})
            with hub.lock:
                hub.lfs_objects[match["oid"]] = body
            self._reply(200)

        def do_POST(self):
            self._log()
            body = self._body()
            path = self.path.split("?")[0]
            if not self._authorized():
                return
            if path == "/api/repos/create":
                payload = json.loads(body)
                repo_type = payload.get("type") or "model"
                repo_id = f"{payload['organization']}/{payload['name']}"
                url = f"{hub.url}/{prefixes[repo_type]}{repo_id}"
                with hub.lock:
                    if (repo_type, repo_id) in hub.repos:
                        return self._reply(409, {"error": "You already created this repo", "url": url})
                    hub.repos[(repo_type, repo_id)] = {"settings": payload, "files": {}, "commits": []}
                return self._reply(200, {"url": url})
            if path == "/api/validate-yaml":
                payload = json.loads(body)
                hub.validated.append(payload)
                try:
                    ModelCard(payload["content"])
                except ValueError as error:
                    return self._reply(400, {"errors": [{"message": str(error)}]}, "BadRequest")
                return self._reply(200, {"warnings": []})
            match = re.fullmatch(rf"/api/(?P<type>models|datasets|spaces)/{_REPO_PATH}/preupload/[\w.\-]+", path)
            if match:
                if self._repo(match["type"][:-1], match) is None:
                    return
                files = json.loads(body)["files"]
                modes = [
                    {
                        "path": f["path"],
                        "uploadMode": "lfs" if f["path"].endswith((".safetensors", ".bin")) else "regular",
                        "shouldIgnore": False,
                    }
                    for f in files
                ]
                return self._reply(200, {"files": modes})
            match = re.fullmatch(rf"/(?P<prefix>datasets/|spaces/)?{_REPO_PATH}\.git/info/lfs/objects/batch", path)
            if match:
                repo_type = {"datasets/": "dataset", "spaces/": "space"}.get(match["prefix"] or "", "model")
                if self._repo(repo_type, match) is None:
                    return
                objects = [
                    {
                        "oid": item["oid"],
                        "size": item["size"],
                        "actions": {
                            "upload": {"href": f"{hub.url}/lfs-upload/{item['oid']}"},
                            "verify": {"href": f"{hub.url}/lfs-verify"},
                        },
                    }
                    for item in json.loads(body)["objects"]
                ]
                return self._reply(200, {"transfer": "basic", "objects": objects})
            if path == "/lfs-verify":
                item = json.loads(body)
                stored = hub.lfs_objects.get(item["oid"])
                if stored is None or len(stored) != item["size"]:
                    return self._reply(404, {"error": "object not uploaded"})
                return self._reply(200)
            match = re.fullmatch(rf"/api/(?P<type>models|datasets|spaces)/{_REPO_PATH}/commit/[\w.\-]+", path)
            if match:
                repo = self._repo(match["type"][:-1], match)
                if repo is None:
                    return
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                header, files = lines[0], {}
                assert header["key"] == "header"
                for line in lines[1:]:
                    value = line["value"]
                    if line["key"] == "file":
                        files[value["path"]] = base64.b64decode(value["content"])
                    elif line["key"] == "lfsFile":
                        if value["oid"] not in hub.lfs_objects:
                            return self._reply(400, {"error": f"LFS object of {value['path']} missing"})
                        files[value["path"]] = hub.lfs_objects[value["oid"]]
                    else:
                        return self._reply(400, {"error": f"unsupported operation {line['key']}"})
                oid = hashlib.sha1(body).hexdigest()
                with hub.lock:
                    repo["files"].update(files)
                    repo["commits"].append({"header": header["value"], "paths": sorted(files), "oid": oid})
                url = f"{hub.url}/{prefixes[match['type'][:-1]]}{match['owner']}/{match['name']}/commit/{oid}"
                return self._reply(200, {"commitUrl": url, "commitOid": oid, "pullRequestUrl": None})
            self._reply(404, {"error": f"no route {path}"})

    return Handler


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """A running stand-in Hub; `huggingface_hub` is put online (tests run with HF_HUB_OFFLINE=1), without Xet,
    and its default endpoint points to the stand-in."""
    from huggingface_hub import constants

    hub = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(hub))
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    # huggingface_hub fetches an "agent harness" registry (GET /api/agent-harnesses) and caches it under HF_HOME
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
    monkeypatch.setenv("HF_TOKEN", "hf_not_this_one")  # an explicit token must win over the environment
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()


def _local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_push_model_folder_uploads_every_file_and_a_regenerated_card(trained_model_dir, fake_hub):
    info = push_model_folder(trained_model_dir, "tester/stego-tiny", private=True, token=TOKEN)
    repo = fake_hub.repos[("model", "tester/stego-tiny")]
    assert repo["settings"] == {
        "name": "stego-tiny",
        "organization": "tester",
        "visibility": "private",
        "type": "model",
    }
    local = _local_files(trained_model_dir)
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "eval_results.json"} <= set(local)
    uploaded = repo["files"]
    assert set(uploaded) == set(local)
    for name, content in local.items():
        if name != "README.md":
            assert uploaded[name] == content, name
    # the weights went through the LFS batch API (PUT + verify), the rest inline in the commit
    weights_oid = hashlib.sha256(local["model.safetensors"]).hexdigest()
    assert fake_hub.lfs_objects == {weights_oid: local["model.safetensors"]}
    assert ("POST", "/tester/stego-tiny.git/info/lfs/objects/batch", f"Bearer {TOKEN}") in fake_hub.requests
    assert ("PUT", f"/lfs-upload/{weights_oid}", None) in fake_hub.requests
    # the card: regenerated for the repository, validated by the (stand-in) Hub before the upload
    readme = uploaded["README.md"].decode()
    assert readme == str(model_card_from_folder(trained_model_dir, repo_id="tester/stego-tiny"))
    assert 'pipeline("image-segmentation", model="tester/stego-tiny")' in readme
    expected = _percent_table(json.loads(local["eval_results.json"]))
    assert card_eval_results(readme) == expected
    assert [v["repoType"] for v in fake_hub.validated] == ["model"]
    assert fake_hub.validated[0]["content"] == readme
    # one commit, our message, and the explicit token on every Hub API call
    assert [c["header"]["summary"] for c in repo["commits"]] == ["Upload hf_useg model"]
    posts = [(path, auth) for method, path, auth in fake_hub.requests if method == "POST"]
    assert len(posts) == 6 and all(auth == f"Bearer {TOKEN}" for _, auth in posts)
    assert info.commit_url == f"{fake_hub.url}/tester/stego-tiny/commit/{repo['commits'][0]['oid']}"
    # a second push to the existing repository adds a commit
    push_model_folder(trained_model_dir, "tester/stego-tiny", token=TOKEN, card="keep", commit_message="again")
    assert [c["header"]["summary"] for c in repo["commits"]] == ["Upload hf_useg model", "again"]
    assert repo["files"]["README.md"] == local["README.md"]  # card="keep": the folder's own card


def test_push_refuses_bad_folders_before_any_request(tmp_path, trained_model_dir, fake_hub):
    with pytest.raises(ValueError, match="has no config.json"):
        push_model_folder(tmp_path, "tester/empty", token=TOKEN)
    _tiny_backbone().save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match="has no \\*.safetensors weights"):
        push_model_folder(tmp_path / "vit", "tester/vit", token=TOKEN)
    (tmp_path / "vit" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="holds a 'vit' model, not an hf_useg segmentation model"):
        push_model_folder(tmp_path / "vit", "tester/vit", token=TOKEN)
    with pytest.raises(ValueError, match="card must be 'regenerate' or 'keep'"):
        push_model_folder(trained_model_dir, "tester/x", token=TOKEN, card="new")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name, content in _local_files(trained_model_dir).items():
        (broken / name).write_bytes(content)
    (broken / "README.md").write_text("# no metadata")
    with pytest.raises(ValueError, match="invalid model card: pipeline_tag is None"):
        push_model_folder(broken, "tester/x", token=TOKEN, card="keep")
    (broken / "preprocessor_config.json").unlink()
    with pytest.raises(ValueError, match="has no preprocessor_config.json"):
        push_model_folder(broken, "tester/x", token=TOKEN)
    assert fake_hub.requests == []


def test_push_with_a_wrong_token_fails_with_the_hub_error(trained_model_dir, fake_hub):
    from huggingface_hub.errors import HfHubHTTPError

    with pytest.raises(HfHubHTTPError, match="401"):
        push_model_folder(trained_model_dir, "tester/stego-tiny", token="hf_wrong")
    assert fake_hub.repos == {}


def test_push_space_folder_with_package_and_model(trained_model_dir, fake_hub):
    space_dir = REPO_ROOT / "spaces"
    push_space_folder(space_dir, "tester/hf-useg-demo", token=TOKEN, model_dirs=[trained_model_dir])
    repo = fake_hub.repos[("space", "tester/hf-useg-demo")]
    assert repo["settings"]["type"] == "space" and repo["settings"]["sdk"] == "gradio"
    files = repo["files"]
    for name in ("app.py", "README.md", "requirements.txt"):
        assert files[name] == (space_dir / name).read_bytes()
    package = REPO_ROOT / "hf_useg"
    for name in ("__init__.py", "hub/push.py", "resources/model_card_template.md", "models/stego/modeling_stego.py"):
        assert files[f"hf_useg/{name}"] == (package / name).read_bytes()
    assert not [name for name in files if "__pycache__" in name or name.endswith(".pyc")]
    model_name = trained_model_dir.name
    assert files[f"models/{model_name}/model.safetensors"] == (trained_model_dir / "model.safetensors").read_bytes()
    assert ("POST", "/spaces/tester/hf-useg-demo.git/info/lfs/objects/batch", f"Bearer {TOKEN}") in fake_hub.requests
    assert [v["repoType"] for v in fake_hub.validated] == ["space"]


def test_push_space_folder_checks_the_front_matter(tmp_path, fake_hub):
    (tmp_path / "app.py").write_text("print('hi')\n")
    with pytest.raises(ValueError, match="has no README.md"):
        push_space_folder(tmp_path, "tester/space", token=TOKEN)
    (tmp_path / "README.md").write_text("---\nsdk: streamlit\napp_file: app.py\n---\n")
    with pytest.raises(ValueError, match="declares sdk 'streamlit'"):
        push_space_folder(tmp_path, "tester/space", token=TOKEN)
    (tmp_path / "README.md").write_text("---\nsdk: gradio\napp_file: main.py\n---\n")
    with pytest.raises(ValueError, match="names app_file 'main.py', which does not exist"):
        push_space_folder(tmp_path, "tester/space", token=TOKEN)
    assert fake_hub.requests == []


def test_cli_push(trained_model_dir, fake_hub, capsys):
    from hf_useg.cli import main

    assert main(["push", str(trained_model_dir), "tester/cli-model", "--private", "--token", TOKEN]) == 0
    repo = fake_hub.repos[("model", "tester/cli-model")]
    assert repo["settings"]["visibility"] == "private"
    assert repo["files"]["model.safetensors"] == (trained_model_dir / "model.safetensors").read_bytes()
    assert f"-> {fake_hub.url}/tester/cli-model" in capsys.readouterr().out
    assert main(["push", str(REPO_ROOT / "spaces"), "tester/cli-space", "--space", "--token", TOKEN]) == 0
    assert "hf_useg/__init__.py" in fake_hub.files("space", "tester/cli-space")
    capsys.readouterr()
    # mistakes are one line on stderr, exit status 2
    assert main(["push", str(REPO_ROOT / "spaces"), "tester/x", "--token", TOKEN]) == 2
    assert re.fullmatch(r"hf-useg: .*has no config.json.* \(push .*spaces to tester/x\)\n", capsys.readouterr().err)
    assert main(["push", str(trained_model_dir), "tester/y", "--token", "hf_wrong"]) == 2
    assert "401" in capsys.readouterr().err
    assert main(["push", str(trained_model_dir), "tester/y", "--no-package"]) == 2
    assert capsys.readouterr().err == "hf-useg: --with-model and --no-package only apply with --space (push)\n"


def test_push_a_fine_tuned_detector_with_its_detection_card(tmp_path, fake_hub):
    from tiny_configs import TINY_DETREG_DETECTOR_KWARGS, tiny_resnet_config
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

    from hf_useg.detection_inference import detection_image_processor
    from hf_useg.models.detreg.training_detreg import detector_config_kwargs

    kwargs = detector_config_kwargs(tiny_resnet_config(), dict(TINY_DETREG_DETECTOR_KWARGS))
    labels = {"num_labels": 1, "id2label": {0: "raccoon"}, "label2id": {"raccoon": 0}}
    config = DeformableDetrConfig(**{**kwargs, **labels})
    folder = tmp_path / "detector"
    DeformableDetrForObjectDetection(config).save_pretrained(folder)
    detection_image_processor(64).save_pretrained(folder)
    summary = {"dataset": "../shared/data/raccoon", "steps": 3, "pretraining": "CutMix-DETReg pretraining with cutmix"}
    summary.update({f"{e}_{m}": 0.25 for e in ("coco", "voc07") for m in ("ap", "ap50", "ap75")})
    summary["eval_protocol"] = {"split": "test", "images": 40}
    (folder / "training_summary.json").write_text(json.dumps(summary))

    push_model_folder(folder, "tester/detector", token=TOKEN)
    readme = fake_hub.repos[("model", "tester/detector")]["files"]["README.md"].decode()
    data = ModelCard(readme).data
    assert data.pipeline_tag == "object-detection"
    assert {(r.metric_type, r.metric_value) for r in data.eval_results} == {
        (f"{e}_{m}", 25.0) for e in ("coco", "voc07") for m in ("ap", "ap50", "ap75")
    }
    assert 'pipeline("object-detection", model="tester/detector")' in readme
    assert "CutMix-DETReg pretraining with cutmix" in readme
    with pytest.raises(ValueError, match="pipeline_tag is 'object-detection', expected 'image-segmentation'"):
        validate_model_card(ModelCard(readme))
