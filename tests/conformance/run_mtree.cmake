# Runs mtree on one captured machine and compares its output with QEMU's.
#   cmake -DMTREE=<mtree> -DPYTHON=<python3> -DMACHINE_DIR=<qemu-7.2/machine> -DOUTPUT=<file>
#         -DMODE=flatview|tree|owners|import -P run_mtree.cmake
# flatview: `mtree fixture.json` against mtree-f.txt (compare_flatviews.py, QEMU's rule);
# tree:     `mtree --tree fixture.json` against mtree-D.txt (compare_mtree_tree.py);
# owners:   `mtree --tree --owner fixture.json` against mtree-oD.txt;
# import:   `mtree import` of the machine's texts into OUTPUT (a fixture), which
#           must then print mtree-f.txt and mtree-D.txt (and mtree-oD.txt when
#           the machine has one).
foreach(var MTREE PYTHON MACHINE_DIR OUTPUT MODE)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "run_mtree.cmake: -D${var}=... is required")
  endif()
endforeach()

cmake_path(GET OUTPUT PARENT_PATH output_dir)
file(MAKE_DIRECTORY ${output_dir})

# Prints fixture `json` with `args` into `out` and compares it with `expected`.
function(print_and_compare json args expected compare out)
  execute_process(COMMAND ${MTREE} ${args} ${json}
    WORKING_DIRECTORY ${MACHINE_DIR}
    OUTPUT_FILE ${out}
    RESULT_VARIABLE result)
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "mtree ${args} ${json} failed (${result}) in ${MACHINE_DIR}")
  endif()
  execute_process(COMMAND ${PYTHON} ${CMAKE_CURRENT_LIST_DIR}/${compare} ${expected} ${out}
    WORKING_DIRECTORY ${MACHINE_DIR}
    RESULT_VARIABLE result)
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "output differs: expected ${MACHINE_DIR}/${expected}, got ${out}")
  endif()
endfunction()

if(MODE STREQUAL "flatview")
  print_and_compare(fixture.json "" mtree-f.txt compare_flatviews.py ${OUTPUT})
elseif(MODE STREQUAL "tree")
  print_and_compare(fixture.json "--tree" mtree-D.txt compare_mtree_tree.py ${OUTPUT})
elseif(MODE STREQUAL "owners")
  print_and_compare(fixture.json "--tree;--owner" mtree-oD.txt compare_mtree_tree.py ${OUTPUT})
elseif(MODE STREQUAL "import")
  set(args import --tree mtree-D.txt --flat mtree-f.txt)
  if(EXISTS ${MACHINE_DIR}/mtree-oD.txt)
    list(APPEND args --owners mtree-oD.txt)
  endif()
  if(EXISTS ${MACHINE_DIR}/qom-tree.txt)
    list(APPEND args --qom-tree qom-tree.txt)
  endif()
  execute_process(COMMAND ${MTREE} ${args}
    WORKING_DIRECTORY ${MACHINE_DIR}
    OUTPUT_FILE ${OUTPUT}
    RESULT_VARIABLE result)
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "mtree ${args} failed (${result}) in ${MACHINE_DIR}")
  endif()
  print_and_compare(${OUTPUT} "" mtree-f.txt compare_flatviews.py ${OUTPUT}.f.txt)
  print_and_compare(${OUTPUT} "--tree" mtree-D.txt compare_mtree_tree.py ${OUTPUT}.D.txt)
  if(EXISTS ${MACHINE_DIR}/mtree-oD.txt)
    print_and_compare(${OUTPUT} "--tree;--owner" mtree-oD.txt compare_mtree_tree.py ${OUTPUT}.oD.txt)
  endif()
else()
  message(FATAL_ERROR "run_mtree.cmake: MODE must be flatview, tree, owners or import, not '${MODE}'")
endif()
