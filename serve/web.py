"""The web page served at `/`: upload a volume, browse axial/coronal/sagittal slices of the model input or of the
upload on its own grid, with a window/level control, request a report, ask a question, find similar reports. Plain
HTML + fetch; the bearer token (when the service has one) is typed into the page and sent as a header. A new or
refused upload clears every result of the previous volume first, so no result is ever shown beside another volume."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>med3dvlm</title>
<style>
 body{font:14px system-ui,sans-serif;margin:1.5em;max-width:1000px;color:#222}
 [hidden]{display:none!important}
 fieldset{border:1px solid #ccc;margin:.6em 0;padding:.6em}
 .views{display:flex;gap:1em}.views figure{margin:0;text-align:center}
 .frame{position:relative;width:256px;height:256px;background:#000}
 .frame img{width:256px;height:256px;object-fit:contain;image-rendering:pixelated}
 .frame span{position:absolute;color:#ff0;font-size:11px}
 .plain .o{display:none}
 .t{top:2px;left:50%}.b{bottom:2px;left:50%}.l{left:3px;top:50%}.r{right:3px;top:50%}
 pre{white-space:pre-wrap;background:#f5f5f5;padding:.6em;min-height:1.5em}
 .err{color:#b00}.note{color:#666;font-size:12px}
</style></head><body>
<h1>med3dvlm</h1>
<p class="note">For research use only: not a medical device, not for diagnosis. Slices show the model's input
(after preprocessing and resizing) or, as "native", the upload on its own voxel grid (intensities as the model gets
them, before the crop and resize; every k-th voxel of an axis longer than 256). A NIfTI upload is reoriented and labelled (radiological view: the patient's
right on the image's left); DICOM, slice images and arrays are shown as stored, without labels.</p>
<fieldset><legend>Volume</legend>
 <label>Token <input id="token" type="password" placeholder="bearer token, if the service needs one"></label><br><br>
 <input id="file" type="file" accept=".nii,.gz,.npy,.zip">
 <button id="upload">Upload</button> <span id="status"></span>
</fieldset>
<div id="views" hidden>
 <div class="views">
 <figure><div class="frame"><img id="img0" alt="axial"><span class="o t">A</span><span class="o b">P</span><span class="o l">R</span><span class="o r">L</span></div>
  <figcaption>axial <input id="s0" type="range" min="0" value="0"> <span id="n0"></span></figcaption></figure>
 <figure><div class="frame"><img id="img1" alt="coronal"><span class="o t">S</span><span class="o b">I</span><span class="o l">R</span><span class="o r">L</span></div>
  <figcaption>coronal <input id="s1" type="range" min="0" value="0"> <span id="n1"></span></figcaption></figure>
 <figure><div class="frame"><img id="img2" alt="sagittal"><span class="o t">S</span><span class="o b">I</span><span class="o l">A</span><span class="o r">P</span></div>
  <figcaption>sagittal <input id="s2" type="range" min="0" value="0"> <span id="n2"></span></figcaption></figure>
 </div>
 <label>window <input id="win" type="range" min="1" max="255" value="255"></label>
 <label>level <input id="lev" type="range" min="0" max="255" value="128"></label>
 <label>view <select id="view"><option value="input">model input</option><option value="native">native</option></select></label>
 <span class="note">(display only, on the model's 0-255 input; the model always sees the whole range)</span>
</div>
<fieldset><legend>Report</legend><button id="report" disabled>Generate report</button>
 <label>max new tokens <input id="max_tokens" type="number" min="1" max="512" value="128"></label>
 <pre id="report_out"></pre></fieldset>
<fieldset><legend>Question</legend>
 <input id="question" size="60" placeholder="e.g. Which organ shows the lesion?"><br>
 A <input id="ca" size="14"> B <input id="cb" size="14"> C <input id="cc" size="14"> D <input id="cd" size="14">
 <button id="ask" disabled>Ask</button><pre id="answer_out"></pre>
</fieldset>
<fieldset id="retrieval" hidden><legend>Retrieval</legend>
 <button id="similar" disabled>Reports most similar to this volume</button> or
 <input id="query" size="40" placeholder="findings text"> <button id="search">Find volumes</button>
 <pre id="retrieve_out"></pre></fieldset>
<script>
let vid = null, shape = null, shapes = null;
const $ = id => document.getElementById(id);
const OUT = ["report_out", "answer_out", "retrieve_out"];
function headers(){ const t = $("token").value.trim(); return t ? {"Authorization": "Bearer " + t} : {}; }
async function refused(r){
  const j = await r.json().catch(() => ({detail: r.statusText}));
  return new Error(r.status + ": " + (typeof j.detail === "string" ? j.detail : JSON.stringify(j.detail)));
}
async function call(path, form){
  const r = await fetch(path, {method: "POST", headers: headers(), body: form});
  if (!r.ok) throw await refused(r);
  return r.json();
}
function clearVolume(){
  vid = null; shape = null; shapes = null; $("views").hidden = true;
  for (const b of ["report", "ask", "similar"]) $(b).disabled = true;
  for (const o of OUT) $(o).textContent = "";
  for (const a of [0, 1, 2]) { const img = $("img" + a);
    if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src); img.removeAttribute("src"); }
}
async function show(axis){
  if (!vid) return;
  const i = $("s" + axis).value, id = vid;
  $("n" + axis).textContent = `${+i + 1} / ${shape[axis]}`;
  const q = `window=${$("win").value}&level=${$("lev").value}&view=${$("view").value}`;
  const r = await fetch(`v1/volumes/${id}/slice/${axis}/${i}?${q}`, {headers: headers()});
  if (r.ok && id === vid) $("img" + axis).src = URL.createObjectURL(await r.blob());
}
$("win").oninput = $("lev").oninput = () => [0, 1, 2].forEach(show);
function setView(){  // the sliders follow the shape of the chosen view, each starting at its middle slice
  shape = shapes[$("view").value];
  for (const a of [0, 1, 2]) { $("s" + a).max = shape[a] - 1; $("s" + a).value = Math.floor(shape[a] / 2); }
  return Promise.all([0, 1, 2].map(show));
}
$("view").onchange = () => { if (vid) setView(); };
$("upload").onclick = async () => {
  const f = $("file").files[0]; if (!f) return;
  clearVolume();
  const fd = new FormData(); fd.append("file", f);
  $("status").textContent = "uploading..."; $("status").className = "";
  try {
    const j = await call("v1/upload", fd);
    vid = j.volume_id; shape = j.preprocessing.output_shape;
    shapes = {input: shape, native: j.preprocessing.display_shape};
    $("views").className = j.preprocessing.format === "nifti" ? "" : "plain";
    $("status").textContent = `volume ${vid} (${f.name}): ${j.preprocessing.format} ` +
      `${j.preprocessing.input_shape.join("x")} -> ${shape.join("x")}`;
    // the volume is ready for questions now; its slices load alongside
    $("views").hidden = false; for (const b of ["report", "ask", "similar"]) $(b).disabled = false;
    for (const a of [0, 1, 2]) $("s" + a).oninput = () => show(a);
    await setView();
  } catch (e) { clearVolume(); $("status").textContent = `${f.name} refused: ${e.message}`; $("status").className = "err"; }
};
async function run(out, path, fd, render){
  const id = vid; $(out).textContent = "working...";
  try { const j = await call(path, fd); if (id === vid) $(out).textContent = render(j); }
  catch (e) { if (id === vid) $(out).textContent = e.message; }
}
// Server-Sent Events: each `data: {"text"}` piece is shown as it comes, `event: done` replaces it with the whole answer
async function stream(out, path, fd, render){
  const id = vid; $(out).textContent = "working..."; fd.append("stream", "true");
  try {
    const r = await fetch(path, {method: "POST", headers: headers(), body: fd});
    if (!r.ok) throw await refused(r);
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "", text = "", done = false;
    while (!done) {
      const chunk = await reader.read(); done = chunk.done; buf += chunk.value || "";
      for (let k; (k = buf.indexOf("\\n\\n")) >= 0; buf = buf.slice(k + 2)) {
        const ev = buf.slice(0, k), data = ev.split("\\n").filter(l => l.startsWith("data: ")).map(l => l.slice(6)).join("");
        if (id !== vid) { reader.cancel(); return; }  // another volume since: stop this generation
        if (ev.startsWith("event: done")) { $(out).textContent = render(JSON.parse(data)); return; }
        text += JSON.parse(data).text; $(out).textContent = text;
      }
    }
    if (id === vid) $(out).textContent = text + "\\n\\n(the answer stopped early)";
  } catch (e) { if (id === vid) $(out).textContent = e.message; }
}
$("report").onclick = () => {
  const fd = new FormData(); fd.append("volume_id", vid); fd.append("max_new_tokens", $("max_tokens").value);
  stream("report_out", "v1/report", fd, j => (j.report || "(empty report)") + `\\n\\n[${j.timings.total_s} s]`);
};
$("ask").onclick = () => {
  const fd = new FormData(); fd.append("volume_id", vid); fd.append("question", $("question").value);
  fd.append("max_new_tokens", $("max_tokens").value);
  for (const [k, id] of [["choice_a","ca"],["choice_b","cb"],["choice_c","cc"],["choice_d","cd"]])
    if ($(id).value.trim()) fd.append(k, $(id).value);
  stream("answer_out", "v1/vqa", fd, j => j.answer + (j.choice ? `  [choice ${j.choice}: ${j.choice_text}]` : ""));
};
const hits = j => j.results.map(h => `${h.score.toFixed(3)}  ${h.volume_id}: ${h.report}`).join("\\n") || "(none)";
$("similar").onclick = () => { const fd = new FormData(); fd.append("volume_id", vid); run("retrieve_out", "v1/retrieve", fd, hits); };
$("search").onclick = () => { const fd = new FormData(); fd.append("text", $("query").value);
  run("retrieve_out", "v1/retrieve", fd, hits); };
fetch("healthz").then(r => r.json()).then(h => { $("retrieval").hidden = !h.retrieval; }).catch(() => {});
</script></body></html>
"""
