//! A dense 3-D array in NIfTI voxel order: `x` varies fastest, then `y`, then `z`.
//!
//! That memory order is numpy's C order for shape `(z, y, x)`, which is exactly the array
//! nnU-Net works on for a canonical image (the nibabel `(x, y, z)` array transposed). So
//! `Volume::c_shape()` is "the shape as nnU-Net sees it" and no transposition is ever copied.

#[derive(Clone, Debug, PartialEq)]
pub struct Volume<T> {
    /// `[nx, ny, nz]`
    pub dims: [usize; 3],
    pub data: Vec<T>,
}

impl<T> Volume<T> {
    pub fn new(dims: [usize; 3], data: Vec<T>) -> Self {
        assert_eq!(dims.iter().product::<usize>(), data.len(), "volume data length does not match {dims:?}");
        Volume { dims, data }
    }

    pub fn filled(dims: [usize; 3], value: T) -> Self
    where
        T: Clone,
    {
        Volume { dims, data: vec![value; dims.iter().product()] }
    }

    /// Linear index of voxel `(x, y, z)`.
    #[inline]
    pub fn index(&self, x: usize, y: usize, z: usize) -> usize {
        x + self.dims[0] * (y + self.dims[1] * z)
    }

    #[cfg(test)]
    pub fn get(&self, x: usize, y: usize, z: usize) -> &T {
        &self.data[self.index(x, y, z)]
    }

    /// The shape in C order, `(nz, ny, nx)`: nnU-Net's axes for a canonical image.
    pub fn c_shape(&self) -> [usize; 3] {
        [self.dims[2], self.dims[1], self.dims[0]]
    }
}
