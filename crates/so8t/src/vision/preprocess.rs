//! Qwen2-VL's image processor (transformers' `Qwen2VLImageProcessorPil`): an image file
//! into the rows of pixels the vision tower's patch embedding reads. The steps are
//! transformers': RGB, `smart_resize` to multiples of patch × merge within the pixel
//! bounds, Pillow's bicubic resampling of the 8-bit image (reproduced here to the integer,
//! fixed-point arithmetic included, so the resized bytes are Pillow's), ×1/255, the
//! CLIP mean and std, the frame repeated over the temporal patch, and the patches laid out
//! merge block by merge block.

use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// `preprocessor_config.json`'s fields that change the pixels.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageProcessorConfig {
    pub min_pixels: usize,
    pub max_pixels: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub merge_size: usize,
    pub rescale_factor: f64,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

impl Default for ImageProcessorConfig {
    /// Qwen2-VL's defaults (transformers' class attributes).
    fn default() -> Self {
        ImageProcessorConfig {
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 1280,
            patch_size: 14,
            temporal_patch_size: 2,
            merge_size: 2,
            rescale_factor: 1.0 / 255.0,
            image_mean: [0.481_454_66, 0.457_827_5, 0.408_210_73],
            image_std: [0.268_629_54, 0.261_302_58, 0.275_777_11],
        }
    }
}

#[derive(Deserialize)]
struct RawSize {
    shortest_edge: Option<usize>,
    longest_edge: Option<usize>,
    min_pixels: Option<usize>,
    max_pixels: Option<usize>,
}

#[derive(Deserialize)]
struct RawConfig {
    size: Option<RawSize>,
    min_pixels: Option<usize>,
    max_pixels: Option<usize>,
    patch_size: Option<usize>,
    temporal_patch_size: Option<usize>,
    merge_size: Option<usize>,
    rescale_factor: Option<f64>,
    image_mean: Option<[f32; 3]>,
    image_std: Option<[f32; 3]>,
    resample: Option<u32>,
    do_resize: Option<bool>,
    do_rescale: Option<bool>,
    do_normalize: Option<bool>,
}

impl ImageProcessorConfig {
    /// Reads `preprocessor_config.json`; fields it lacks keep Qwen2-VL's defaults.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let raw: RawConfig = crate::error::parse_json(text, path)?;
        let d = Self::default();
        // Older files give min/max_pixels at the top level, newer ones in `size`
        // (shortest_edge / longest_edge, which transformers reads as the same bounds).
        let size = raw.size.as_ref();
        let cfg = ImageProcessorConfig {
            min_pixels: raw
                .min_pixels
                .or(size.and_then(|s| s.shortest_edge.or(s.min_pixels)))
                .unwrap_or(d.min_pixels),
            max_pixels: raw
                .max_pixels
                .or(size.and_then(|s| s.longest_edge.or(s.max_pixels)))
                .unwrap_or(d.max_pixels),
            patch_size: raw.patch_size.unwrap_or(d.patch_size),
            temporal_patch_size: raw.temporal_patch_size.unwrap_or(d.temporal_patch_size),
            merge_size: raw.merge_size.unwrap_or(d.merge_size),
            rescale_factor: raw.rescale_factor.unwrap_or(d.rescale_factor),
            image_mean: raw.image_mean.unwrap_or(d.image_mean),
            image_std: raw.image_std.unwrap_or(d.image_std),
        };
        let bad = |what: String| Err(Error::format(path, what));
        // PIL's BICUBIC is 3; the others would need their own filters.
        if let Some(r) = raw.resample.filter(|&r| r != 3) {
            return bad(format!("field `resample` is {r}; only 3 (bicubic, Qwen2-VL's) is supported"));
        }
        for (name, on) in [("do_resize", raw.do_resize), ("do_rescale", raw.do_rescale), ("do_normalize", raw.do_normalize)] {
            if on == Some(false) {
                return bad(format!("field `{name}` is false; Qwen2-VL's processor always does it"));
            }
        }
        if cfg.patch_size == 0 || cfg.merge_size == 0 || cfg.temporal_patch_size == 0 {
            return bad("fields `patch_size`, `merge_size` and `temporal_patch_size` must be positive".into());
        }
        let factor = cfg.patch_size * cfg.merge_size;
        if cfg.min_pixels > cfg.max_pixels || cfg.max_pixels < factor * factor || cfg.max_pixels > MAX_PIXELS_LIMIT {
            return bad(format!(
                "pixel bounds min {} / max {} must satisfy min ≤ max, {} ≤ max ≤ {MAX_PIXELS_LIMIT}",
                cfg.min_pixels,
                cfg.max_pixels,
                factor * factor
            ));
        }
        if cfg.image_std.iter().any(|s| !(s.is_finite() && *s > 0.0)) || !cfg.rescale_factor.is_finite() {
            return bad("fields `image_std` must be positive and `rescale_factor` finite".into());
        }
        Ok(cfg)
    }

    /// The pixels of one patch row: channels × temporal patch × patch².
    pub fn row_width(&self) -> usize {
        3 * self.temporal_patch_size * self.patch_size * self.patch_size
    }
}

/// A bound on `max_pixels` (the processor resizes every image to at most this many pixels,
/// so it bounds every buffer below): the largest Qwen's processors allow, 16384 merged
/// patches of 28² (12.8 megapixels).
const MAX_PIXELS_LIMIT: usize = 16384 * 28 * 28;

/// An image's pixel rows for the vision tower, `[t·h·w, row_width]`, and its patch grid.
#[derive(Clone, Debug)]
pub struct PixelRows {
    pub rows: Vec<f32>,
    /// (temporal, height, width) in patches.
    pub grid: [usize; 3],
}

/// transformers' `smart_resize`: the size, in multiples of `factor`, nearest the image's
/// within `[min_pixels, max_pixels]` at about its aspect ratio. Float steps as Python's
/// (`round` ties to even).
pub fn smart_resize(height: usize, width: usize, factor: usize, min_pixels: usize, max_pixels: usize) -> Result<(usize, usize)> {
    let (h, w, f) = (height as f64, width as f64, factor as f64);
    if height == 0 || width == 0 {
        return Err(Error::Invalid(format!("an image of {width}×{height} pixels has no pixels")));
    }
    if h.max(w) / h.min(w) > 200.0 {
        return Err(Error::Invalid(format!(
            "absolute aspect ratio must be smaller than 200, got {}",
            h.max(w) / h.min(w)
        )));
    }
    let mut h_bar = (h / f).round_ties_even() * f;
    let mut w_bar = (w / f).round_ties_even() * f;
    if h_bar * w_bar > max_pixels as f64 {
        let beta = ((h * w) / max_pixels as f64).sqrt();
        h_bar = f.max((h / beta / f).floor() * f);
        w_bar = f.max((w / beta / f).floor() * f);
    } else if h_bar * w_bar < min_pixels as f64 {
        let beta = (min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / f).ceil() * f;
        w_bar = (w * beta / f).ceil() * f;
    }
    Ok((h_bar as usize, w_bar as usize))
}

/// Pillow's bicubic kernel (a = −0.5).
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Pillow's fixed point: 32 bits less 8 for the result, less 2 for the overshoot.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// For each output pixel along one axis, Pillow's `precompute_coeffs` then
/// `normalize_coeffs_8bpc`: the first input pixel and the fixed-point weights.
fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C's (int) truncates toward zero.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let mut k: Vec<f64> = (xmin..xmax).map(|x| bicubic((x as f64 - center + 0.5) * ss)).collect();
            let ww: f64 = k.iter().sum();
            if ww != 0.0 {
                k.iter_mut().for_each(|w| *w /= ww);
            }
            let one = (1u32 << PRECISION_BITS) as f64;
            let fixed = k
                .iter()
                .map(|&w| if w < 0.0 { (-0.5 + w * one) as i32 } else { (0.5 + w * one) as i32 })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's horizontal pass over rows `first..first + rows` of `src` (`width` wide).
fn horizontal_pass(src: &[u8], width: usize, first: usize, rows: usize, coeffs: &[(usize, Vec<i32>)]) -> Vec<u8> {
    let out_w = coeffs.len();
    let mut out = vec![0u8; rows * out_w * 3];
    for y in 0..rows {
        let line = &src[(first + y) * width * 3..(first + y + 1) * width * 3];
        for (xx, (xmin, k)) in coeffs.iter().enumerate() {
            for c in 0..3 {
                let mut acc: i32 = 1 << (PRECISION_BITS - 1);
                for (j, &w) in k.iter().enumerate() {
                    acc += line[(xmin + j) * 3 + c] as i32 * w;
                }
                out[(y * out_w + xx) * 3 + c] = clip8(acc);
            }
        }
    }
    out
}

/// Pillow's vertical pass of `src` (`width` wide), whose row 0 is input row `row0`.
fn vertical_pass(src: &[u8], width: usize, row0: usize, coeffs: &[(usize, Vec<i32>)]) -> Vec<u8> {
    let mut out = vec![0u8; coeffs.len() * width * 3];
    for (yy, (ymin, k)) in coeffs.iter().enumerate() {
        for x in 0..width * 3 {
            let mut acc: i32 = 1 << (PRECISION_BITS - 1);
            for (j, &w) in k.iter().enumerate() {
                acc += src[(ymin - row0 + j) * width * 3 + x] as i32 * w;
            }
            out[yy * width * 3 + x] = clip8(acc);
        }
    }
    out
}

/// Pillow's `Image.resize(..., BICUBIC)` of an 8-bit RGB image (`[h, w, 3]` bytes): two
/// passes, each rounding to 8 bits. Current Pillow (13.0, what the fixtures were made
/// with) runs the vertical pass first when the height shrinks by more than twice as many
/// pixels as the width (`horizontal_first` in its Resample.c); older releases always ran
/// the horizontal pass first, which moves some bytes of such images by a few levels.
pub fn resize_bicubic(rgb: &[u8], width: usize, height: usize, out_w: usize, out_h: usize) -> Vec<u8> {
    let (need_h, need_v) = (out_w != width, out_h != height);
    let shrink_h = height as i64 - out_h as i64;
    let horizontal_first = !(shrink_h > 0 && shrink_h > (width as i64 - out_w as i64) * 2);
    let vert = coefficients(height, out_h);
    let horiz = coefficients(width, out_w);
    if horizontal_first {
        // The horizontal pass covers only the rows the vertical pass reads.
        let (first, last) = {
            let (lo, k) = &vert[out_h - 1];
            (vert[0].0, lo + k.len())
        };
        let (tmp, row0) = if need_h {
            (horizontal_pass(rgb, width, first, last - first, &horiz), first)
        } else {
            (rgb.to_vec(), 0)
        };
        if need_v {
            vertical_pass(&tmp, out_w, row0, &vert)
        } else {
            tmp
        }
    } else {
        let tmp = vertical_pass(rgb, width, 0, &vert);
        if need_h {
            horizontal_pass(&tmp, width, 0, out_h, &horiz)
        } else {
            tmp
        }
    }
}

/// Decodes a PNG or JPEG file's bytes into 8-bit RGB, as Pillow's `convert("RGB")`
/// (grey replicated, alpha dropped, palettes expanded); `what` names it in errors.
pub fn decode_rgb(bytes: &[u8], what: &Path, max_pixels_in: usize) -> Result<(Vec<u8>, usize, usize)> {
    let format = image::guess_format(bytes)
        .map_err(|_| Error::format(what, "not a PNG or JPEG image"))?;
    if !matches!(format, image::ImageFormat::Png | image::ImageFormat::Jpeg) {
        return Err(Error::format(what, format!("a {format:?} image; expected PNG or JPEG")));
    }
    let reader = || image::io::Reader::with_format(std::io::Cursor::new(bytes), format);
    // The header's size is checked before anything is decoded or allocated for it.
    let (w, h) = reader()
        .into_dimensions()
        .map_err(|e| Error::format(what, format!("cannot read the image's header: {e}")))?;
    let (w, h) = (w as usize, h as usize);
    if w.saturating_mul(h) > max_pixels_in {
        return Err(Error::format(
            what,
            format!("an image of {w}×{h} pixels is over the limit of {max_pixels_in} pixels"),
        ));
    }
    let mut limits = image::io::Limits::default();
    limits.max_alloc = Some((max_pixels_in as u64) * 8);
    let mut decoder = reader();
    decoder.limits(limits);
    let img = decoder
        .decode()
        .map_err(|e| Error::format(what, format!("cannot decode the image: {e}")))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    Ok((img.to_rgb8().into_raw(), w, h))
}

/// The largest image (in pixels, before resizing) `decode_rgb` accepts: 64 megapixels.
pub const MAX_INPUT_PIXELS: usize = 1 << 26;

impl ImageProcessorConfig {
    /// An image file's bytes into pixel rows.
    pub fn preprocess(&self, bytes: &[u8], what: &Path) -> Result<PixelRows> {
        let (rgb, w, h) = decode_rgb(bytes, what, MAX_INPUT_PIXELS)?;
        self.preprocess_rgb(&rgb, w, h).map_err(|e| match e {
            Error::Invalid(m) => Error::format(what, m),
            e => e,
        })
    }

    /// 8-bit RGB `[h, w, 3]` into pixel rows.
    pub fn preprocess_rgb(&self, rgb: &[u8], width: usize, height: usize) -> Result<PixelRows> {
        let (p, m, t) = (self.patch_size, self.merge_size, self.temporal_patch_size);
        let (rh, rw) = smart_resize(height, width, p * m, self.min_pixels, self.max_pixels)?;
        let img = if (rh, rw) == (height, width) {
            rgb.to_vec()
        } else {
            resize_bicubic(rgb, width, height, rw, rh)
        };
        // transformers: uint8 × scale in f64, to f32; then (x − mean) / std in f32.
        let plane: Vec<Vec<f32>> = (0..3)
            .map(|c| {
                let (mean, std) = (self.image_mean[c], self.image_std[c]);
                (0..rh * rw)
                    .map(|i| ((img[i * 3 + c] as f64 * self.rescale_factor) as f32 - mean) / std)
                    .collect()
            })
            .collect();
        let (gh, gw) = (rh / p, rw / p);
        let width_row = self.row_width();
        let mut rows = Vec::with_capacity(gh * gw * width_row);
        // Rows in merge-block order: (block row, block col, row in block, col in block);
        // each row (channel, temporal copy, y, x).
        for bh in 0..gh / m {
            for bw in 0..gw / m {
                for mh in 0..m {
                    for mw in 0..m {
                        let (py, px) = ((bh * m + mh) * p, (bw * m + mw) * p);
                        for pl in &plane {
                            for _ in 0..t {
                                for y in 0..p {
                                    let at = (py + y) * rw + px;
                                    rows.extend_from_slice(&pl[at..at + p]);
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(PixelRows { rows, grid: [1, gh, gw] })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_rounds_ties_to_even_and_keeps_the_bounds() {
        // 70 / 28 = 2.5: Python's round gives 2.
        assert_eq!(smart_resize(70, 90, 28, 56 * 56, 28 * 28 * 1280).unwrap(), (56, 84));
        // 98 / 28 = 3.5: 4.
        assert_eq!(smart_resize(98, 98, 28, 56 * 56, 28 * 28 * 1280).unwrap(), (112, 112));
        // Upscaled to reach min_pixels, downscaled to stay under max_pixels.
        assert_eq!(smart_resize(20, 20, 28, 56 * 56, 28 * 28 * 1280).unwrap(), (56, 56));
        assert_eq!(smart_resize(300, 200, 28, 56 * 56, 28 * 28 * 16).unwrap(), (112, 84));
        assert!(smart_resize(1, 300, 28, 56 * 56, 28 * 28 * 1280).is_err());
    }

    #[test]
    fn resizing_keeps_what_it_must() {
        let rgb: Vec<u8> = (0..6 * 4 * 3).map(|i| (i * 7 % 256) as u8).collect();
        // The same size: neither pass runs.
        assert_eq!(resize_bicubic(&rgb, 6, 4, 6, 4), rgb);
        // A flat image stays flat at any size, either pass first (the fixed-point weights
        // of each output pixel sum to one).
        let flat = vec![137u8; 30 * 20 * 3];
        for (w, h) in [(12, 40), (60, 7), (29, 21), (30, 9)] {
            assert!(resize_bicubic(&flat, 30, 20, w, h).iter().all(|&v| v == 137), "{w}×{h}");
        }
    }
}
