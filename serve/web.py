"""The web page served at `/`: upload a volume, browse axial/coronal/sagittal slices, request a report, ask a question.
Plain HTML + fetch; the bearer token (when the service has one) is typed into the page and sent as a header."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>med3dvlm</title>
<style>
 body{font:14px system-ui,sans-serif;margin:1.5em;max-width:980px;color:#222}
 fieldset{border:1px solid #ccc;margin:.6em 0;padding:.6em}
 .views{display:flex;gap:1em}.views figure{margin:0;text-align:center}
 .views img{width:256px;height:256px;object-fit:contain;background:#000;image-rendering:pixelated}
 pre{white-space:pre-wrap;background:#f5f5f5;padding:.6em;min-height:1.5em}
 .err{color:#b00}
</style></head><body>
<h1>med3dvlm</h1>
<fieldset><legend>Volume</legend>
 <label>Token <input id="token" type="password" placeholder="bearer token, if the service needs one"></label><br><br>
 <input id="file" type="file" accept=".nii,.gz,.npy,.zip">
 <button id="upload">Upload</button> <span id="status"></span>
</fieldset>
<div class="views" id="views" hidden>
 <figure><img id="img0" alt="axial"><figcaption>axial <input id="s0" type="range" min="0" value="0"></figcaption></figure>
 <figure><img id="img1" alt="coronal"><figcaption>coronal <input id="s1" type="range" min="0" value="0"></figcaption></figure>
 <figure><img id="img2" alt="sagittal"><figcaption>sagittal <input id="s2" type="range" min="0" value="0"></figcaption></figure>
</div>
<fieldset><legend>Report</legend><button id="report" disabled>Generate report</button>
 <label>max new tokens <input id="max_tokens" type="number" min="1" max="512" value="128"></label>
 <pre id="report_out"></pre></fieldset>
<fieldset><legend>Question</legend>
 <input id="question" size="60" placeholder="e.g. Which organ shows the lesion?"><br>
 A <input id="ca" size="14"> B <input id="cb" size="14"> C <input id="cc" size="14"> D <input id="cd" size="14">
 <button id="ask" disabled>Ask</button><pre id="answer_out"></pre>
</fieldset>
<script>
let vid = null, shape = null;
const $ = id => document.getElementById(id);
function headers(){ const t = $("token").value.trim(); return t ? {"Authorization": "Bearer " + t} : {}; }
async function call(path, form){
  const r = await fetch(path, {method: "POST", headers: headers(), body: form});
  const j = await r.json().catch(() => ({detail: r.statusText}));
  if (!r.ok) throw new Error(r.status + ": " + (typeof j.detail === "string" ? j.detail : JSON.stringify(j.detail)));
  return j;
}
async function show(axis){
  const i = $("s" + axis).value;
  const r = await fetch(`v1/volumes/${vid}/slice/${axis}/${i}`, {headers: headers()});
  if (r.ok) $("img" + axis).src = URL.createObjectURL(await r.blob());
}
$("upload").onclick = async () => {
  const f = $("file").files[0]; if (!f) return;
  const fd = new FormData(); fd.append("file", f);
  $("status").textContent = "uploading..."; $("status").className = "";
  try {
    const j = await call("v1/upload", fd);
    vid = j.volume_id; shape = j.preprocessing.output_shape;
    $("status").textContent = `volume ${vid}: ${j.preprocessing.format} ${j.preprocessing.input_shape.join("x")} -> ${shape.join("x")}`;
    for (const a of [0, 1, 2]) { $("s" + a).max = shape[a] - 1; $("s" + a).value = Math.floor(shape[a] / 2);
      $("s" + a).oninput = () => show(a); await show(a); }
    $("views").hidden = false; $("report").disabled = false; $("ask").disabled = false;
  } catch (e) { $("status").textContent = e.message; $("status").className = "err"; }
};
$("report").onclick = async () => {
  const fd = new FormData(); fd.append("volume_id", vid); fd.append("max_new_tokens", $("max_tokens").value);
  $("report_out").textContent = "generating...";
  try { const j = await call("v1/report", fd);
        $("report_out").textContent = (j.report || "(empty report)") + `\n\n[${j.timings.total_s} s]`; }
  catch (e) { $("report_out").textContent = e.message; }
};
$("ask").onclick = async () => {
  const fd = new FormData(); fd.append("volume_id", vid); fd.append("question", $("question").value);
  fd.append("max_new_tokens", $("max_tokens").value);
  for (const [k, id] of [["choice_a","ca"],["choice_b","cb"],["choice_c","cc"],["choice_d","cd"]])
    if ($(id).value.trim()) fd.append(k, $(id).value);
  $("answer_out").textContent = "thinking...";
  try { const j = await call("v1/vqa", fd);
        $("answer_out").textContent = j.answer + (j.choice ? `  [choice ${j.choice}: ${j.choice_text}]` : ""); }
  catch (e) { $("answer_out").textContent = e.message; }
};
</script></body></html>
"""
