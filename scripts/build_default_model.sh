#!/usr/bin/env bash
# Reproduce the embedded default model (assets/default-model/) end to end with the project's own
# tools: shapes-world data → stage 1 (ldm-train-vae) → stage 2 (ldm-train-unet) → half-precision
# export → the quality gate (ldm-shapes eval on 240 held-out prompts). Seeded throughout; every
# setting is in configs/vae/shapes-f8.yaml and configs/unet/shapes.yaml.
#   scripts/build_default_model.sh [WORK_DIR]        (default runs/; resumable: rerun after a stop)
# THE SHIPPED MODEL, v2 (2026-12-06): v1 below plus stages 2c (78 min) and 2d (39 min) on a 2-core
# Intel Xeon (AVX512-BF16), about 6 h in all. At the defaults, 600 held-out prompts each: 90.0% on
# the usual mix (single 100, two 93, counting 81, position 96, attributes 93, background 77: white
# 66, gray 95, black 64) and 78.8% on the hard mix (ldm-shapes eval --mix hard; v1: 68.3%; black
# 68%, from 44.5%); assets/default-model/README.md. Issue 30's goals (hard >= 90%, usual >= 95%,
# black >= 90%) are not met yet.
# v1 (2026-12-01, a 2-core AMD EPYC with AVX512-BF16, no GPU): data 1 min per 100,000
# images, stage 1 19 min, latent caches 4 min each, stage 2a 102 min, stage 2b 109 min: about 4 h.
# The exported float16 folder, at the defaults (euler, 25 steps, CFG 7.5, guidance rescale 0.7):
# 87.7% on 600 held-out prompts (single 100, two 91, counting 79, position 98, attributes 88,
# background 70: white 69, gray 85, black 50), 89.2% on 240; the quality gate is met
# (assets/default-model/README.md). The U-Net trains in two runs (below): 2a alone scored 63.3%
# (dpm++2m, no rescale), and 2b, a warm restart on data with white and black backgrounds 12.5% of
# the scenes each, scored 77.5% after 4,000 of its steps under the same settings. At 16,000 the
# sampler decides much: dpm++2m 80.8% (64.2% without guidance rescale), euler 89.2%, ddim 88.8%,
# so euler became the default sampler. Each run resumes after a stop (SIGTERM; rerun this script).
# What follows is the history that led here, oldest first.
# On a 2-core x86 CPU without a GPU: data ~3 min, VAE 31-36 min, latent cache 5 min (measured);
# U-Net 0.72 s/step, so its 22,000 steps take ~4.4 h (a run spans sessions: stop it with SIGTERM,
# rerun this script to resume). The 8-channel run's EMA
# model on 240 held-out prompts (CFG 7.5): 30.8% at step 9,240; 52.5% at 22,000, the end of its
# cosine (single 78, two 70, counting 70, position 12.5, attributes 38, background 48); at CFG 3 the
# same model scores 67.5% (position 30%). Position is at chance because the model never learned
# to read the relation words (scripts/probe_relations.py: the relation holds in 49% of images,
# 49% if the word is ignored, at steps 5,000, 9,240 and 22,000 alike). scripts/probe_roles.py shows
# what it reads instead: word order (which object is named first) but not the relation word.
# (Those runs used the data as it was before relation captions were drawn mostly along their
# axis: ldm.data.shapes._relation_layout.) scripts/probe_binding.py found what hides it: its relation
# contrast (twin captions that differ only in the relation word) stays at 0 for 600 steps of
# per-image targets when the backgrounds that captions do not name are random, as in those runs,
# and reaches 0.88 on the same scenes with them gray. So the U-Net now trains on
# --unnamed-background gray (the spec's scenes otherwise; its evaluation asks for a background only
# when one is named), and from step 6,000 draws half of its timesteps from t >= 800
# (objective.timestep_bias_*; configs/unet/shapes.yaml). That run (runs/unet-shapes-v4b; EMA,
# CFG 7.5): relation contrast 0 until 9,470, then 0.01 / 0.22 / 0.44 / 0.52 / 0.59 at 10,500 /
# 11,500 / 12,500 / 13,500 / 14,500. On 240 held-out prompts: 73.3% at 14,500, 80.0% at 15,500,
# 78.8% at 16,500 (single 100, two 95, counting 72.5, position 85, attributes 80, background 40).
# What still fails the gate is the background kind: named white and black backgrounds, 0 of 22 at
# 16,500 (gray 16 of 18). Objects on them are missing, merged or off-colour at every guidance
# scale (1, 3, 7.5), under guidance rescale, guidance off above t = 800, and an APG-style
# projection alike; the random-background run drew them cleanly (13 of 22 at CFG 3). With gray as
# the unnamed default, white and black are 5.5% of the scenes each (a third each before).
# Fine-tuning on data with the background kind weighted (ldm-shapes make --kinds ...,
# text_encoder.path + model.pretrained; white and black a third of its scenes) moved them from 0 to
# 3 of 22 in 2,000 steps (lr 1e-4). Not solved yet.
# On a lent H200 (2026-11-23; 10 steps/s per run, four runs side by side), two runs reached ~8,000
# steps (EMA, 240 prompts, CFG 7.5). text_encoder.architecture=bert on the gray data: 77.1% (single
# 100, two 95, counting 57.5, position 90, attributes 75, background 45: white 0/11, gray 17/18,
# black 1/11). The bidirectional encoder reads the relation words thousands of steps earlier than
# the causal CLIP one, which at 9,470 steps still had a relation contrast of 0. The CLIP preset on
# data with the background kind x3 (--kinds ...,background,background,background): 52.5%
# (position 22.5; white 3/11, black 0/11). Neither fixes white and black by 8,000 steps. BERT on
# the spec's random backgrounds (CPU, same config) is far behind BERT on gray at 8,000 steps: 27.1%
# (position 10, white 3/11, gray 6/18, black 1/11). So gray data stays, and BERT over it is the
# best start seen. scripts/probe_latent_contrast.py shows why white and black are hard: in this
# VAE's latents a single object on white or black has a third of the contrast it has on gray
# (0.90 and 0.79 against 2.39, with the background's offset 2.8 against 0.8), so its SNR at every
# timestep is about a ninth. Those objects only emerge late in sampling, where little of the
# prompt still steers. That points at the latent space (a VAE that keeps objects' contrast on
# every background) as the lever, more than the text encoder or the data's share. Untested: the
# random-background run drew them after 22,000 steps with a third of its scenes on each.
# A stronger KL term is not that lever: 2,500-step VAEs at loss.kl_weight 1e-6 / 1e-4 / 1e-3 keep
# the white:gray contrast ratio at 0.31 / 0.34 / 0.29 and lose PSNR (24.2 / 22.7 / 20.5 dB).
# Stage 1 on the spec's data (a third of the scenes on each background) was not reliable: rerun on
# 2026-11-23 it ended at a scorer ceiling of 81.2% (seed 0) and 88.3% (seed 1), not the recorded
# 96.7%, failing small shapes on gray, the U-Net's background. Trained on the U-Net's gray data it
# failed white and black instead (70.7%). It now trains on gray-unnamed data with the background
# kind x6 (white and black 18% each): 97.1%, every background >= 95% (rerun 2026-12-01: 97.9%;
# docs/train-vae.md), and its latents hold white and black objects' contrast better (1.03 and 1.33
# against gray's 1.50, from 0.81 / 0.81 / 1.75). Check the VAE with scripts/score_vae_shapes.py
# before stage 2. run.mixed_precision=bf16 makes both stages 1.4x faster on an AMX CPU (1.64x for the
# U-Net on an AMD EPYC with AVX512-BF16); the presets stay float32 (the VAE learned more slowly per
# step in bf16). The whole recipe in one CPU session (2026-12-01, 2-core AMD EPYC, runs/unet-bert):
# data 1 min, this VAE 19 min (97.9%), cache 4 min, then the U-Net with
# text_encoder.architecture=bert run.mixed_precision=bf16 run.max_steps=16000 (cosine over 16,000,
# bias from 6,000) in 102 min at 0.36 s/step. EMA model, 240 held-out prompts: 35.4% at 4,000 and
# 45.8% at 8,000 (48 prompts each), and at 16,000 **63.3% at CFG 7.5** (single 100, two 72.5,
# counting 60, position 37.5, attributes 65, background 45: white 3/11, gray 14/18, black 1/11) and
# 72.5% at CFG 3 (position 50, background 47.5). Behind fp32 BERT on the H200 at 8,000 steps of
# the preset's 22,000-step cosine (77.1%, position 90) and v4b (80.0%): this run changed three
# things at once (bf16, the new VAE, the shorter cosine), so which one cost the score is not
# known. It does read the relation words (scripts/probe_relations.py --num 16: the relation
# holds in 78% of images where both objects are found, 46% if the word were ignored); what fails is
# drawing the objects: both were found in only 143 of 192 probe images, and the failures at 8,000
# were mostly wrong shapes (square drawn as circle) and extra objects.
# What it did show: the new VAE's better white/black contrast does not by itself make the U-Net
# draw on white and black (4/22, as before).
# To follow a run:
#   ldm-train-unet --config runs/unet-shapes/config.yaml --export latest runs/eval/latest
#   ldm-shapes eval --model runs/eval/latest --num-prompts 48
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-runs}
stamp() { date +%s; }
log() { echo "[build_default_model] $*" >&2; }

t0=$(stamp)
# The VAE's data (80,000 scenes, gray where no background is named, white and black 18% each) and
# the held-out images are made by scripts/train_vae_shapes.sh, called below.
# The U-Net's data: the spec's scenes, with the backgrounds their captions do not name painted gray
# (the random ones bury the relation words; see ldm/data/shapes.py and scripts/probe_binding.py).
[ -f "$WORK/data/shapes-100k-gray/metadata.jsonl" ] || ldm-shapes make --out "$WORK/data/shapes-100k-gray" --num 100000 --size 64 --seed 0 --unnamed-background gray
t1=$(stamp); log "data: $((t1 - t0)) s"

# Stage 1: the f = 8 autoencoder (64×64×3 → 8×8×8), L1 + KL, 10,000 steps.
[ -f "$WORK/vae-shapes-f8/final/config.json" ] || DATA="$WORK/data" scripts/train_vae_shapes.sh "$WORK/vae-shapes-f8"
t2=$(stamp); log "stage 1 (VAE): $((t2 - t1)) s"
# The VAE's reconstructions bound every U-Net on its latents: stop here, not 4 hours later, if they
# cannot pass the gate with room to spare (this recipe: 97.1%; on the spec's background mix 81-88%).
python scripts/score_vae_shapes.py "$WORK/vae-shapes-f8/final" "$WORK/data/shapes-val" --min-accuracy 0.9 ||
  { log "stage 1 fell short: retrain it (e.g. another run.seed) before stage 2"; exit 1; }

# Stage 2: the tokenizer (CLIP's BPE pruned to the world's words), the latent caches, the U-Net in
# two runs. 2a: the preset with the bidirectional (BERT) text encoder, bf16, 16,000 steps on the gray
# data. 2b: a warm restart from 2a's EMA weights (U-Net and text encoder) for 16,000 more steps at
# half the learning rate, on data with the background kind x3 (white and black 12.5% of the scenes
# each, from 5.5%), with the timestep bias on from its first step.
python scripts/build_shapes_tokenizer.py assets/shapes-tokenizer
U=(--config configs/unet/shapes.yaml --vae "$WORK/vae-shapes-f8/final" --data "$WORK/data/shapes-100k-gray"
   --output-dir "$WORK/unet-shapes" cache.dir="$WORK/cache" run.mixed_precision=bf16)
ldm-train-unet "${U[@]}" --build-cache
t3=$(stamp); log "latent cache: $((t3 - t2)) s"
[ -f "$WORK/unet-shapes/final/model_index.json" ] || ldm-train-unet "${U[@]}" --resume latest
[ -f "$WORK/data/shapes-100k-gray-bg3/metadata.jsonl" ] || ldm-shapes make --out "$WORK/data/shapes-100k-gray-bg3" --num 100000 --size 64 --seed 2 \
  --unnamed-background gray --kinds single,two,counting,position,attributes,background,background,background
C=(--config configs/unet/shapes.yaml --vae "$WORK/vae-shapes-f8/final" --data "$WORK/data/shapes-100k-gray-bg3"
   --output-dir "$WORK/unet-shapes-c1" cache.dir="$WORK/cache"
   text_encoder.architecture=bert text_encoder.path="$WORK/unet-shapes/final/text_encoder" model.pretrained="$WORK/unet-shapes/final"
   run.mixed_precision=bf16 run.max_steps=16000 run.seed=1 optim.lr=1.5e-4 objective.timestep_bias_from_step=0)
ldm-train-unet "${C[@]}" --build-cache
[ -f "$WORK/unet-shapes-c1/final/model_index.json" ] || ldm-train-unet "${C[@]}" --resume latest
# 2c (v2, issue 30): a warm restart from 2b (--base: its U-Net, text encoder, VAE and schedule) for
# 10,000 steps at learning rate 1e-4 on data that weights the hard cases: half the usual draws, half
# the hard mix (pairs of one colour, counts of three and four, both sizes named), each with the
# background kind x3, named backgrounds white / gray / black / black (black 18.75% of the scenes).
[ -f "$WORK/data/shapes-100k-hard/metadata.jsonl" ] || ldm-shapes make --out "$WORK/data/shapes-100k-hard" --num 100000 --size 64 --seed 3 \
  --unnamed-background gray --mix usual,hard --kinds single,two,counting,position,attributes,background,background,background \
  --backgrounds white,gray,black,black
H=(--config configs/unet/shapes.yaml --base "$WORK/unet-shapes-c1/final" --data "$WORK/data/shapes-100k-hard"
   --output-dir "$WORK/unet-shapes-c2" cache.dir="$WORK/cache"
   run.mixed_precision=bf16 run.max_steps=10000 run.seed=3 optim.lr=1e-4 objective.timestep_bias_from_step=0)
ldm-train-unet "${H[@]}" --build-cache
[ -f "$WORK/unet-shapes-c2/final/model_index.json" ] || ldm-train-unet "${H[@]}" --resume latest
# 2d: one more warm restart, from 2c, on the same data (its latent cache is reused: the VAE is the
# same), 6,000 steps at 1e-4. 2c had lifted the hard mix from 68.3% to 76.8% and was still rising.
D=(--config configs/unet/shapes.yaml --base "$WORK/unet-shapes-c2/final" --data "$WORK/data/shapes-100k-hard"
   --output-dir "$WORK/unet-shapes-c3" cache.dir="$WORK/cache"
   run.mixed_precision=bf16 run.max_steps=6000 run.seed=4 optim.lr=1e-4 objective.timestep_bias_from_step=0)
[ -f "$WORK/unet-shapes-c3/final/model_index.json" ] || ldm-train-unet "${D[@]}" --resume latest
t4=$(stamp); log "stage 2 (U-Net): $((t4 - t3)) s"

# Ship: float16 weights + the world's vocabulary, then the quality gate on the shipped folder, on
# the usual mix and the hard one.
python scripts/export_default_model.py "$WORK/unet-shapes-c3/final" assets/default-model
ldm-shapes eval --model assets/default-model --outdir "$WORK/eval-default" --num-prompts 600 --cfg 7.5 --overwrite
ldm-shapes eval --model assets/default-model --outdir "$WORK/eval-default-hard" --num-prompts 600 --cfg 7.5 --mix hard --overwrite
t5=$(stamp); log "export + evaluation: $((t5 - t4)) s; total $((t5 - t0)) s on $(getconf _NPROCESSORS_ONLN) CPU cores"
