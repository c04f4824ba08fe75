"""The comparison report (`hf_useg.report`): two tiny models (a fitted DINO k-means on a random ViT and an untrained
STEGO with an extra cluster, so one cluster stays unmatched) scored on generated scenes saved as an images/labels
folder. The report's numbers must be those of ``hf-useg evaluate`` on the same folder, the confusion figure's data
the metric's matrix re-ordered by the matching, and the HTML must stand alone."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from tiny_configs import tiny_vit_config

from hf_useg import (
    DinoForUnsupervisedSegmentation,
    DinoSegmentationConfig,
    StegoConfig,
    StegoForUnsupervisedSegmentation,
)
from hf_useg.cli import main
from hf_useg.data import load_segmentation_dataset, save_synthetic_scenes, synthetic_class_names
from hf_useg.data.processing import ProcessedSegmentationDataset, collate_segmentation_batch
from hf_useg.image_processing import protocol_image_processor, whole_image_processor
from hf_useg.inference import evaluate_segmenter, summarize
from hf_useg.report import (
    ExampleSet,
    class_palette,
    evaluate_for_report,
    matched_confusion,
    matched_prediction,
    plot_confusion,
    plot_examples,
    plot_per_class_iou,
    row_normalize,
    write_comparison_report,
    write_confusion_figure,
)

NUM_CLASSES = 3
RESOLUTION = 32
CLASS_NAMES = synthetic_class_names(NUM_CLASSES)
KMEANS_BACKBONE = "random-vit-micro (randomly initialised ViT)"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The scenes folder, two saved model folders and their report (written once for the module)."""
    root = tmp_path_factory.mktemp("report")
    scenes = save_synthetic_scenes(
        root / "scenes", num_images=6, image_size=40, num_classes=NUM_CLASSES, seed=3, split="val"
    )
    processor = protocol_image_processor(RESOLUTION)
    torch.manual_seed(0)
    kmeans = DinoForUnsupervisedSegmentation(
        DinoSegmentationConfig(backbone_config=tiny_vit_config(), num_clusters=NUM_CLASSES)
    )
    val = load_segmentation_dataset(str(scenes), "val")
    items = ProcessedSegmentationDataset(val, processor, NUM_CLASSES)
    kmeans.fit([collate_segmentation_batch([items[i] for i in range(len(items))])["pixel_values"]], progress=False)
    stego = StegoForUnsupervisedSegmentation(
        StegoConfig(
            backbone_config=tiny_vit_config(), backbone_name=None, dim=8, num_classes=NUM_CLASSES, extra_clusters=1
        )
    )
    folders = {"kmeans": root / "kmeans" / "model", "stego": root / "stego-run" / "model"}
    for name, model in (("kmeans", kmeans), ("stego", stego)):
        model.save_pretrained(folders[name])
        whole_image_processor(RESOLUTION, 8).save_pretrained(folders[name])
    summary = {"backbone": KMEANS_BACKBONE, "steps": 0, "dataset": "synthetic"}
    (folders["kmeans"] / "training_summary.json").write_text(json.dumps(summary))
    models = {
        name: type(model).from_pretrained(folders[name]).eval()
        for name, model in (("kmeans", kmeans), ("stego", stego))
    }
    reports = [
        evaluate_for_report(
            models[name], val, processor, NUM_CLASSES, model_path=folders[name], batch_size=4, num_examples=2
        )
        for name in ("kmeans", "stego")
    ]
    output = root / "out"
    path = write_comparison_report(
        reports, output, class_names=CLASS_NAMES, protocol={"dataset": "scenes", "split": "val"}
    )
    return {
        "scenes": scenes,
        "val": val,
        "processor": processor,
        "folders": folders,
        "models": models,
        "reports": reports,
        "output": output,
        "path": path,
    }


def _table_after(markdown: str, heading: str) -> list[dict[str, str]]:
    """The rows of the first Markdown table after ``heading``, as {column: cell}."""
    section = markdown.split(heading, 1)[1]
    lines = [line for line in section.split("\n\n", 2)[1].splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]


def _percent(value: float) -> str:
    return f"{100 * value:.2f}" if np.isfinite(value) else "–"


def test_report_files_and_model_descriptions(setup):
    output = setup["output"]
    names = [report.name for report in setup["reports"]]
    assert names == ["kmeans/model", "stego-run/model"]
    expected = {"report.md", "report.html", "results.json", "per_class_iou.png", "examples.png"}
    expected |= {"confusion_kmeans_model.png", "confusion_stego-run_model.png"}
    assert {path.name for path in output.iterdir()} == expected
    rows = _table_after(setup["path"].read_text(), "## Results")
    assert [(row["model"], row["method"], row["backbone"], row["steps"]) for row in rows] == [
        ("kmeans/model", "DINO-feature k-means", KMEANS_BACKBONE, "0"),
        ("stego-run/model", "STEGO", "unnamed vit (random or local weights)", "–"),
    ]
    protocol = {
        row["setting"]: row["value"] for row in _table_after(setup["path"].read_text(), "## Evaluation protocol")
    }
    assert protocol == {
        "dataset": "scenes",
        "split": "val",
        "resolution (crop side, px)": "32",
        "crop": "center",
        "horizontal-flip TTA": "yes",
        "dense CRF": "no",
        "cluster-to-class matching (cluster probe)": "hungarian",
        "images evaluated": "6",
    }


def test_every_number_equals_hf_useg_evaluate(setup, capsys):
    markdown = setup["path"].read_text()
    results_rows = {row["model"]: row for row in _table_after(markdown, "## Results")}
    class_rows = {row["class"]: row for row in _table_after(markdown, "## Per-class IoU")}
    record = json.loads((setup["output"] / "results.json").read_text())
    for report, entry in zip(setup["reports"], record["models"]):
        folder = setup["folders"]["kmeans" if report.model_type == "dino_segmentation" else "stego"]
        arguments = ["--split", "val", "--resolution", str(RESOLUTION), "--output-dir", str(folder.parent / "eval")]
        arguments += ["--device", "cpu"]  # the report was computed on the CPU; on a GPU machine the CLI would use it
        assert main(["evaluate", str(folder), "--dataset", str(setup["scenes"]), "--quiet", *arguments]) == 0
        printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        row = results_rows[report.name]
        for probe in ("cluster", "linear"):
            for metric, column in (("accuracy", "acc"), ("mean_iou", "mIoU")):
                key = f"{probe}_{metric}"
                assert row[f"{probe} {column} (%)"] == (_percent(printed[key]) if key in printed else "–")
        assert ("linear_accuracy" in printed) == (report.model_type == "stego")
        # per-class IoU: the CLI's eval_results.json and an independent evaluate_segmenter run
        evaluated = json.loads((folder.parent / "eval" / "eval_results.json").read_text())
        direct = evaluate_segmenter(
            setup["models"]["kmeans" if report.model_type == "dino_segmentation" else "stego"],
            setup["val"],
            setup["processor"],
            NUM_CLASSES,
            batch_size=2,
            progress=False,
        )
        for index, class_name in enumerate(CLASS_NAMES):
            iou = evaluated["cluster"]["per_class_iou"][index]
            assert class_rows[class_name][report.name] == _percent(np.nan if iou is None else iou)
            assert direct["cluster"]["per_class_iou"][index] == pytest.approx(
                np.nan if iou is None else iou, nan_ok=True
            )
        assert class_rows["mean (mIoU)"][report.name] == _percent(printed["cluster_mean_iou"])
        # results.json carries every number of the evaluation
        assert entry["summary"] == pytest.approx({k: printed[k] for k in summarize(direct)})
        assert entry["results"]["cluster"]["confusion_matrix"] == evaluated["cluster"]["confusion_matrix"]
        assert entry["results"]["cluster"]["assignment"] == evaluated["cluster"]["assignment"]


def test_matched_confusion_reorders_the_metric_matrix():
    confusion = np.array([[0, 4, 1], [3, 1, 0], [2, 0, 0], [0, 0, 7]])  # 4 clusters x 3 classes
    assignment = np.array([1, 0, -1, 2])
    expected = np.array([[3, 0, 0], [1, 4, 0], [0, 1, 7]])  # [true, matched]
    np.testing.assert_array_equal(matched_confusion(confusion, assignment, 3), expected)
    with_unmatched = matched_confusion(confusion, assignment, 3, include_unmatched=True)
    np.testing.assert_array_equal(with_unmatched, np.c_[expected, [2, 0, 0]])
    np.testing.assert_array_equal(with_unmatched.sum(1), confusion.sum(0))  # every pixel of each class counted
    with pytest.raises(ValueError, match="do not fit"):
        matched_confusion(confusion, assignment[:3], 3)


def test_confusion_figure_data_is_the_metrics_matrix(setup, tmp_path):
    record = json.loads((setup["output"] / "results.json").read_text())
    for report, entry in zip(setup["reports"], record["models"]):
        metric = report.results["cluster"]
        unmatched = bool((metric["assignment"] < 0).any())
        assert unmatched == (report.model_type == "stego")  # STEGO's extra cluster is matched to no class
        matched = matched_confusion(
            metric["confusion_matrix"], metric["assignment"], NUM_CLASSES, include_unmatched=unmatched
        )
        figure = plot_confusion(metric["confusion_matrix"], metric["assignment"], CLASS_NAMES, title=report.name)
        axes = figure.axes[0]
        data = axes.images[0].get_array()
        np.testing.assert_allclose(np.ma.filled(data, np.nan), row_normalize(matched), equal_nan=True)
        # the diagonal of the row-normalised matrix is the metric's per-class accuracy
        np.testing.assert_allclose(np.diag(row_normalize(matched)), metric["per_class_accuracy"], equal_nan=True)
        np.testing.assert_array_equal(
            entry["matched_confusion"]["cluster"],
            matched_confusion(metric["confusion_matrix"], metric["assignment"], NUM_CLASSES, include_unmatched=True),
        )
        assert [label.get_text() for label in axes.get_yticklabels()] == CLASS_NAMES
        assert [label.get_text() for label in axes.get_xticklabels()][:NUM_CLASSES] == CLASS_NAMES
        assert axes.get_ylabel() == "ground-truth class" and "matched" in axes.get_xlabel()
        assert len(figure.axes) == 2  # the matrix and its colour bar
    # the saved figure for model folders (the card embeds it)
    path = write_confusion_figure(
        setup["reports"][0].results, CLASS_NAMES, tmp_path / "model" / "confusion_matrix.png"
    )
    assert path.read_bytes().startswith(b"\x89PNG")


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.external: list[tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        for name in ("src", "href"):
            if attrs.get(name) and not attrs[name].startswith(("data:", "#")):
                self.external.append((tag, attrs[name]))
        if tag in ("link", "script"):
            self.external.append((tag, str(attrs)))


def test_html_embeds_the_figures_and_stands_alone(setup):
    output = setup["output"]
    page = (output / "report.html").read_text()
    parser = _Links()
    parser.feed(page)
    assert parser.external == []
    markdown = setup["path"].read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert linked == [
        "per_class_iou.png",
        "confusion_kmeans_model.png",
        "confusion_stego-run_model.png",
        "examples.png",
    ]
    assert len(parser.images) == len(linked)
    for source, file_name in zip(parser.images, linked):
        prefix = "data:image/png;base64,"
        assert source.startswith(prefix)
        assert base64.b64decode(source[len(prefix) :]) == (output / file_name).read_bytes()
    # the same tables as the Markdown
    for row in _table_after(markdown, "## Results"):
        assert f"<td>{row['model']}</td><td>{row['method']}</td>" in page
        assert f"<td>{row['cluster mIoU (%)']}</td>" in page
    assert "<style>" in page and page.rstrip().endswith("</html>")


def test_examples_grid_uses_one_class_palette(setup):
    reports = setup["reports"]
    examples = reports[0].examples
    assert len(examples.images) == 2 and examples.indices == [0, 5]  # spread over the 6 images, first and last
    # the examples are the evaluated crops and labels
    items = ProcessedSegmentationDataset(setup["val"], setup["processor"], NUM_CLASSES)
    for index, item in enumerate(examples.indices):
        np.testing.assert_array_equal(examples.labels[index], items[item]["labels"].numpy())
        assert examples.images[index].shape == (RESOLUTION, RESOLUTION, 3)
        assert examples.images[index].dtype == np.uint8
    predictions = {report.name: report.examples.predictions for report in reports}
    assignments = {report.name: report.results["cluster"]["assignment"] for report in reports}
    figure = plot_examples(examples, predictions, assignments, CLASS_NAMES)
    assert len(figure.axes) == 2 * (2 + len(reports))
    assert [axes.get_title() for axes in figure.axes[:4]] == ["image", "ground truth", *predictions]
    palette = class_palette(NUM_CLASSES)
    stego = reports[1]
    panel = figure.axes[3].images[0].get_array()  # row 0, STEGO's column
    classes = matched_prediction(stego.examples.predictions[0], assignments[stego.name])
    np.testing.assert_array_equal(panel[classes >= 0], palette[classes[classes >= 0]])
    assert (panel[classes < 0] == (190, 190, 190)).all()
    legend = [text.get_text() for text in figure.legends[0].get_texts()]
    assert legend[:NUM_CLASSES] == CLASS_NAMES and "(cluster matched to no class)" in legend
    with pytest.raises(ValueError, match="1 predictions for 2 images"):
        plot_examples(examples, {"m": predictions[stego.name][:1]}, assignments, CLASS_NAMES)


def test_per_class_bars_and_single_model_report(setup, tmp_path):
    figure = plot_per_class_iou({"a": [0.5, np.nan, 0.25], "b": [1.0, 0.0, 0.5]}, ["road", "sky", "car"])
    axes = figure.axes[0]
    assert [round(bar.get_height(), 6) for bar in axes.patches] == [50.0, 0.0, 25.0, 100.0, 0.0, 50.0]
    assert axes.get_ylabel() == "IoU (%)" and axes.get_xlabel() == "ground-truth class"
    assert [text.get_text() for text in figure.legends[0].get_texts()] == ["a", "b"]
    # one model (hf-useg evaluate --report) with explicit examples, and a duplicate name made unique
    report = setup["reports"][0]
    grid = ExampleSet(report.examples.images[:1], report.examples.labels[:1], [], [0])
    path = write_comparison_report([report, report], tmp_path, class_names=CLASS_NAMES, examples=grid)
    rows = _table_after(path.read_text(), "## Results")
    assert [row["model"] for row in rows] == ["kmeans/model", "kmeans/model (2)"]
    assert "linear acc (%)" not in rows[0]  # no model has a linear probe
    with pytest.raises(ValueError, match="2 class names"):
        write_comparison_report([report], tmp_path, class_names=CLASS_NAMES[:2])


def test_compare_command_writes_the_same_report(setup, tmp_path, capsys):
    folders = setup["folders"]
    output = tmp_path / "compare"
    status = main(
        [
            "compare",
            str(folders["kmeans"]),
            str(folders["stego"]),
            "--device",
            "cpu",
            "--dataset",
            str(setup["scenes"]),
            "--split",
            "val",
            "--num-classes",
            str(NUM_CLASSES),
            "--resolution",
            str(RESOLUTION),
            "--batch-size",
            "4",
            "--report-examples",
            "2",
            "--output-dir",
            str(output),
            "--quiet",
        ]
    )
    assert status == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["report"] == str(output / "report.md")
    # the CLI's report holds the library's numbers for the same models and data (class names from the folder)
    assert _table_after((output / "report.md").read_text(), "## Results") == _table_after(
        setup["path"].read_text(), "## Results"
    )
    assert {path.name for path in output.iterdir()} == {path.name for path in setup["output"].iterdir()}


def test_evaluate_report_option_writes_a_one_model_report(setup, tmp_path, capsys):
    folder = setup["folders"]["kmeans"]
    output = tmp_path / "one"
    args = ["evaluate", str(folder), "--dataset", str(setup["scenes"]), "--split", "val"]
    args += ["--num-classes", str(NUM_CLASSES), "--resolution", str(RESOLUTION), "--batch-size", "4"]
    args += ["--report", str(output), "--report-examples", "2", "--output-dir", str(tmp_path / "eval"), "--quiet"]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = _table_after((output / "report.md").read_text(), "## Results")
    assert len(rows) == 1 and rows[0]["model"] == "kmeans/model"
    assert rows[0]["cluster mIoU (%)"] == _percent(printed["cluster_mean_iou"])
    assert (output / "confusion_kmeans_model.png").exists() and (output / "examples.png").exists()


def test_compare_refuses_bad_arguments(setup, tmp_path, capsys):
    folder = str(setup["folders"]["kmeans"])
    args = ["compare", folder, "--dataset", str(setup["scenes"]), "--report-examples", "0"]
    assert main(args) == 2
    assert "--report-examples must be at least 1" in capsys.readouterr().err
    assert main(["compare", folder, str(tmp_path / "missing"), "--dataset", str(setup["scenes"])]) == 2
    assert "missing" in capsys.readouterr().err
